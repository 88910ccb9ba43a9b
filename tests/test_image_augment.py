"""Image fine-tuning augmentations: RandAugment on the host, random erasing on the device,
and the classifier's learnable pos_embed."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bridle_jax.convert import to_torch
from bridle_jax.data import augment
from bridle_jax.data import image
from bridle_jax.data import inputs
from bridle_jax.data import pipeline
from bridle_jax.data import randaugment
from bridle_jax.evaluate import layer_decay
from bridle_jax.models import classifier as classifier_lib
from bridle_jax.models import pos_embed
from configs import finetune_image
from configs import image as image_config

FILL = (124, 116, 104)


def _noise_image(seed=0, size=(48, 40)) -> Image.Image:
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _op(name, img, f, sign=1.0):
  """Runs operation `name` at level fraction f with a fixed sign draw."""
  class Sign:  # `_signed` negates when random() < 0.5
    def random(self):
      return 0.9 if sign > 0 else 0.1
  return np.asarray(randaugment.OPS[name](img, f, Sign(), FILL)).astype(int)


def test_policy_strings_parse_and_bad_ones_are_refused():
  assert randaugment.parse_policy("rand-m9-mstd0.5-inc1") == (9.0, 0.5)
  assert randaugment.parse_policy("rand-m7-inc1") == (7.0, 0.0)
  assert randaugment.parse_policy("rand-m9-mstd101-inc1") == (9.0, float("inf"))
  for bad in ("rand-m9-mstd0.5", "augmix-m9", "rand-m11-inc1", "rand-m9-n3-inc1",
              "rand-mmax10-m9-inc1", "rand-m-inc1", "rand-m9-inc0", "rand-m9-mstd-inc1"):
    with pytest.raises(ValueError, match="RandAugment policy"):
      randaugment.parse_policy(bad)
  assert randaugment.fill_colour(image.IMAGENET_MEAN) == FILL


def test_pixel_operations_follow_their_levels():
  img = _noise_image()
  x = np.asarray(img).astype(int)
  np.testing.assert_array_equal(_op("Invert", img, 0.3), 255 - x)
  np.testing.assert_array_equal(_op("SolarizeIncreasing", img, 0.0), x)   # threshold 256
  np.testing.assert_array_equal(_op("SolarizeIncreasing", img, 1.0), 255 - x)  # threshold 0
  np.testing.assert_array_equal(_op("SolarizeAdd", img, 1.0),
                                np.where(x < 128, np.minimum(x + 110, 255), x))
  np.testing.assert_array_equal(_op("PosterizeIncreasing", img, 0.0), x & 0xF0)  # 4 bits
  np.testing.assert_array_equal(_op("PosterizeIncreasing", img, 0.6), x & 0xC0)  # 4 - 2 bits
  np.testing.assert_array_equal(_op("PosterizeIncreasing", img, 1.0), 0 * x)     # no bit
  for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
               "SharpnessIncreasing"):
    np.testing.assert_array_equal(_op(name, img, 0.0), x, err_msg=name)  # factor 1
  # Brightness at level 1: factor 1 + 0.9 or 1 - 0.9 with the sign.
  assert np.abs(_op("BrightnessIncreasing", img, 1.0, sign=-1) - 0.1 * x).max() <= 1
  dark = x < 130
  assert np.abs(_op("BrightnessIncreasing", img, 1.0, sign=1)[dark] - 1.9 * x[dark]).max() <= 1


def test_geometric_operations_move_the_image_and_fill_with_the_mean():
  img = _noise_image(size=(40, 100))  # height 40, width 100
  x = np.asarray(img).astype(int)
  for name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
    np.testing.assert_array_equal(_op(name, img, 0.0), x, err_msg=name)
  # Translate by 0.45 x 100 = 45 columns: the image moves left, the right is filled.
  moved = _op("TranslateXRel", img, 1.0)
  np.testing.assert_array_equal(moved[:, :55], x[:, 45:])
  assert (moved[:, 56:] == FILL).all()
  moved = _op("TranslateYRel", img, 1.0, sign=-1)  # 18 rows down
  np.testing.assert_array_equal(moved[18:], x[:22])
  assert (moved[:17] == FILL).all()
  rotated = _op("Rotate", img, 1.0)  # 30 degrees: the corners are fill
  assert (rotated[0, 0] == FILL).all() and (rotated[-1, -1] == FILL).all()


def test_shear_and_rotation_map_pixels_as_timm_does():
  """Shear x by s: out(x, y) = in(x + s y, y) at pixel centres; rotation is anticlockwise for
  a positive angle. Ramps interpolate exactly, so values give the source coordinates."""
  h, w = 60, 100
  xs, ys = np.meshgrid(np.arange(w), np.arange(h))
  ramp_x = Image.fromarray(np.stack([2 * xs] * 3, -1).astype(np.uint8))
  ramp_y = Image.fromarray(np.stack([3 * ys] * 3, -1).astype(np.uint8))
  for sign in (1, -1):
    source_x = xs + sign * 0.3 * (ys + 0.5)
    inside = (source_x > 2) & (source_x < w - 3)
    assert np.abs(_op("ShearX", ramp_x, 1.0, sign)[..., 0] - 2 * source_x)[inside].max() < 1
    source_y = ys + sign * 0.3 * (xs + 0.5)
    inside = (source_y > 2) & (source_y < h - 3)
    assert np.abs(_op("ShearY", ramp_y, 1.0, sign)[..., 0] - 3 * source_y)[inside].max() < 1.5
    # 30 degrees: the x ramp's gradient (2, 0) turns to 2 (cos 30, -+sin 30) (rows go down).
    grad_y, grad_x = np.gradient(_op("Rotate", ramp_x, 1.0, sign)[20:40, 35:65, 0].astype(float))
    np.testing.assert_allclose([grad_x.mean(), grad_y.mean()], [3 ** 0.5, -sign], atol=0.05)


def test_rand_augment_applies_two_draws_each_with_probability_one_half():
  img = _noise_image()
  rng = np.random.default_rng(0)
  unchanged = sum(np.array_equal(np.asarray(randaugment.rand_augment(img, rng, 9, 0.5, FILL)),
                                 np.asarray(img)) for _ in range(400))
  # Untouched when both draws skip (1/4), or when an applied op leaves this noise as it is
  # (AutoContrast on full-range noise): about 1/4 + 2 * 1/2 * 1/15 ... a little over 1/4.
  assert 80 < unchanged < 170
  a = randaugment.rand_augment(img, np.random.default_rng(5), 9, 0.5, FILL)
  b = randaugment.rand_augment(img, np.random.default_rng(5), 9, 0.5, FILL)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # a function of the rng


class _Source(list):
  class_names = ["a", "b", "c"]


def test_the_recipes_wire_their_transforms_into_the_loaders_and_the_device(tmp_path):
  path = str(tmp_path / "x.png")
  _noise_image(size=(300, 260)).save(path)
  record = {"audio": None, "path": path, "labels": [2], "index": 5}
  img = image.load_image(path, name=path)
  x = np.stack([np.asarray(_noise_image(seed, (224, 224))) for seed in range(64)])
  for recipe, tuned in ((finetune_image.get_config("in1k"), True),
                        (image_config.get_config(), False)):
    d = recipe.data
    train = pipeline.example_loader(_Source([record]), d, train=True)
    out = train(record, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    expected = image.train_crop(img, 224, rng, tuple(d.crop_scale), tuple(d.crop_ratio), d.hflip)
    if tuned:  # RandAugment rand-m9-mstd0.5-inc1, filling with the ImageNet mean colour
      assert (train.randaugment, train.fill, tuple(d.crop_scale)) == ((9.0, 0.5), FILL,
                                                                      (0.08, 1.0))
      expected = np.asarray(randaugment.rand_augment(Image.fromarray(expected), rng, 9.0, 0.5,
                                                     FILL))
    else:  # pretraining: crop and flip only
      assert train.randaugment is None and tuple(d.crop_scale) == (0.2, 1.0)
    np.testing.assert_array_equal(out["image"], expected)
    np.testing.assert_array_equal(out["label"], [0, 0, 1])
    assert out["index"] == 5
    evaluation = pipeline.example_loader(_Source([record]), d, train=False)
    np.testing.assert_array_equal(evaluation(record, np.random.default_rng(1))["image"],
                                  image.eval_crop(img, 224))
    # Random erasing (fine-tuning: probability 0.25) runs on the device, given an rng.
    features = inputs.device_features(d)
    plain = np.asarray(features({"image": jnp.asarray(x)}, None))
    np.testing.assert_allclose(plain, image.features(jnp.asarray(x), mean=tuple(d.mean),
                                                     std=tuple(d.std)))
    augmented = np.asarray(features({"image": jnp.asarray(x)}, jax.random.key(0)))
    changed = (augmented != plain).any(axis=(1, 2, 3)).sum()
    assert (5 < changed < 30) if tuned else changed == 0, changed


def test_magnitudes_are_drawn_per_operation_as_the_policy_says(monkeypatch):
  levels = []
  monkeypatch.setattr(randaugment, "OPS", {"Record": lambda img, f, rng, fill: levels.append(f)
                                           or img})
  img, rng = _noise_image(), np.random.default_rng(0)
  for policy in ("rand-m9-mstd0.5-inc1", "rand-m9-mstd101-inc1", "rand-m9-inc1"):
    levels.clear()
    for _ in range(1000):
      randaugment.rand_augment(img, rng, *randaugment.parse_policy(policy), FILL)
    f = np.array(levels)
    assert 900 < len(f) < 1100, policy  # 2 draws x probability 1/2
    if policy == "rand-m9-mstd0.5-inc1":  # N(0.9, 0.05), clipped at 1
      assert abs(np.median(f) - 0.9) < 0.01 and 0.04 < f.std() < 0.056 and f.max() <= 1.0
    elif policy == "rand-m9-mstd101-inc1":  # uniform on [0, 0.9]
      assert abs(f.mean() - 0.45) < 0.03 and f.min() < 0.02 and 0.88 < f.max() <= 0.9
    else:
      np.testing.assert_array_equal(f, 0.9)


def test_random_erasing_fills_one_box_with_noise_at_the_configured_rate():
  images = jnp.full((2000, 32, 48, 3), 7.0)
  out = np.asarray(augment.random_erasing(images, jax.random.key(0), 0.25))
  erased = out != 7.0
  touched = erased.any(axis=(1, 2, 3))
  assert 0.22 < touched.mean() < 0.28
  np.testing.assert_array_equal(np.asarray(augment.random_erasing(images, jax.random.key(0),
                                                                  0.0)), images)
  edges = set()
  for mask in erased[touched][:200]:
    rows, cols = np.nonzero(mask.any(-1))
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a full box
    assert 0.015 * 32 * 48 < h * w < 0.36 * 32 * 48 and h < 32 and w < 48
    edges |= {("top", rows.min() == 0), ("bottom", rows.max() == 31),
              ("left", cols.min() == 0), ("right", cols.max() == 47)}
  # Every offset is possible, the last included (timm: randint(0, H - h) inclusive).
  assert {(edge, True) for edge in ("top", "bottom", "left", "right")} <= edges
  noise = out[erased]
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_a_learnable_pos_embed_starts_at_the_table_and_has_no_weight_decay():
  config = finetune_image.get_config("finetune_demo")
  grid = (8, 8)
  model = classifier_lib.classifier_from_config(config.model, config.finetune, grid, 8)
  x = jnp.zeros((1, 64, 64, 3))
  params = nn.unbox(model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                               x)["params"])
  assert config.finetune.learn_pos_embed
  # timm's layout: the CLS row (zero) first, then the fixed table.
  np.testing.assert_array_equal(params["pos_embed"], pos_embed.image_pos_embed(8, 8, 64))
  mask = layer_decay.decay_mask(params)
  assert mask["pos_embed"] is False and mask["cls_token"] is False
  assert layer_decay.layer_index("pos_embed", 2) == 0
  # It is a parameter: a change moves the pooled features.
  moved = {**params, "pos_embed": params["pos_embed"]
           + jax.random.normal(jax.random.key(3), params["pos_embed"].shape)}
  # The CLS row alone moves them too: it is added to cls_token, which attention mixes in.
  cls_moved = {**params, "pos_embed": params["pos_embed"].at[0].add(
      jax.random.normal(jax.random.key(4), (64,)))}
  x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  pooled = [np.asarray(model.apply({"params": p}, x, method=model.pooled))
            for p in (params, moved, cls_moved)]
  assert np.abs(pooled[0] - pooled[1]).max() > 1e-2
  assert np.abs(pooled[0] - pooled[2]).max() > 1e-2
  # Export: the table as is; one saved without its CLS row (before 2026-11-28) gets a zero
  # one; any other size is refused.
  params = jax.tree.map(np.asarray, moved)
  exported = to_torch.classifier_state_dict(config, params)["pos_embed"]
  np.testing.assert_array_equal(exported, params["pos_embed"][None])
  legacy = to_torch.classifier_state_dict(config, {**params, "pos_embed": params["pos_embed"][1:]})
  np.testing.assert_array_equal(legacy["pos_embed"][0, 1:], params["pos_embed"][1:])
  assert not legacy["pos_embed"][0, 0].any()
  with pytest.raises(ValueError, match=r"pos_embed is \(63, 64\), its input grid needs \(65, 64\)"):
    to_torch.classifier_state_dict(config, {**params, "pos_embed": params["pos_embed"][2:]})
