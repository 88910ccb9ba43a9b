"""Image pretraining: decoding and crops, sources and pipeline, config checks, the demo
corpus, the official image export layout and parity, and the CLI end to end."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from bridle_jax import config_validation
from bridle_jax import workdir as workdir_lib
from bridle_jax.convert import from_torch
from bridle_jax.convert import to_torch
from bridle_jax.data import demo_images
from bridle_jax.data import image
from bridle_jax.data import pipeline
from bridle_jax.data import sources
from bridle_jax.models import classifier as classifier_lib
from bridle_jax.models import pos_embed
from bridle_jax.models import quantizer
from bridle_jax.train import state as state_lib
from configs import image as image_config

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(path, pixels: np.ndarray) -> str:
  Image.fromarray(pixels).save(path)
  return str(path)


# ---------------------------------------------------------------- crops and decoding

def test_random_crop_boxes_cover_the_scale_and_ratio_ranges_inside_the_image():
  rng = np.random.default_rng(0)
  width, height = 300, 200
  areas, ratios = [], []
  for _ in range(2000):
    left, top, w, h = image.random_crop_box(width, height, rng, (0.2, 1.0), (3 / 4, 4 / 3))
    assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
    areas.append(w * h / (width * height))
    ratios.append(w / h)
  # Rounding to whole pixels moves the bounds by a little; in a 3:2 image a crop of ratio
  # <= 4/3 covers at most 8/9 of the area.
  assert 0.19 < min(areas) < 0.22 and 0.85 < max(areas) < 0.9
  assert 0.74 < min(ratios) < 0.78 and 1.28 < max(ratios) < 1.35


def test_a_crop_that_never_fits_falls_back_to_the_largest_centred_allowed_ratio():
  rng = np.random.default_rng(0)
  # A 1000 x 10 strip: no crop of ratio <= 4/3 with area >= 20 % fits.
  assert image.random_crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)
  assert image.random_crop_box(10, 1000, rng) == (0, (1000 - 13) // 2, 10, 13)


def test_train_crop_flips_half_the_time_and_eval_crop_takes_the_centre():
  pixels = np.zeros((64, 96, 3), np.uint8)
  pixels[:, :48, 0] = 255  # left half red, right half black
  img = Image.fromarray(pixels)
  rng = np.random.default_rng(0)
  left_red = [image.train_crop(img, 32, rng, (1.0, 1.0), (1.5, 1.5), hflip=True)[:, 0, 0].mean()
              > 128 for _ in range(200)]
  assert 70 < sum(left_red) < 130  # the whole image, flipped about half the time
  crop = image.train_crop(img, 32, rng, (1.0, 1.0), (1.5, 1.5), hflip=False)
  assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8 and crop[:, 0, 0].min() > 200

  # torchvision's Resize(73) + CenterCrop(64) of a 640 x 427 image: 109 x 73 (long side
  # truncated), then the crop at (round(22.5), round(4.5)) = (22, 4).
  gradient = np.random.default_rng(1).integers(0, 256, (427, 640, 3), dtype=np.uint8)
  resized = Image.fromarray(gradient).resize((109, 73), Image.Resampling.BICUBIC)
  np.testing.assert_array_equal(image.eval_crop(Image.fromarray(gradient), 64),
                                np.asarray(resized.crop((22, 4, 86, 68))))

  marked = np.zeros((300, 200, 3), np.uint8)
  marked[140:160, 90:110] = 255  # a white square at the centre
  out = image.eval_crop(Image.fromarray(marked), 64)
  assert out.shape == (64, 64, 3)
  # Shorter side 200 -> 73 px (64 / 0.875): the square becomes ~7 px in the middle.
  assert out[32, 32].min() > 200 and out[0, 0].max() == 0 and out[28:36, 28:36].mean() > 150


def test_unreadable_images_raise_an_error_naming_the_file(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(image.ImageDecodeError, match="bad.jpg: cannot decode image"):
    image.load_image(str(bad))
  with pytest.raises(image.ImageDecodeError, match="missing.png: file not found"):
    image.load_image(str(tmp_path / "missing.png"))
  gray = _png(tmp_path / "gray.png", np.full((5, 7), 9, np.uint8))
  rgb = image.load_image(gray)
  assert rgb.mode == "RGB" and rgb.size == (7, 5)


def test_features_normalise_each_channel():
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  x = np.asarray(image.features(images, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0)))
  np.testing.assert_allclose(x[0, 0, 0], [-2.0, (128 / 255 - 0.5) / 0.5, 0.5], atol=1e-6)


# ---------------------------------------------------------------- sources and pipeline

def _image_data(manifest: str, label_csv: str = "", data_format: str = "json"):
  data = image_config.get_config("demo").data
  data.update(manifest=manifest, label_csv=label_csv, format=data_format, demo_dir="")
  return data


def test_image_manifests_and_folders_open_as_sources(tmp_path):
  paths = demo_images.write_demo_images(str(tmp_path / "corpus"), images_per_class=2,
                                        eval_images_per_class=1)
  source = sources.open_source(_image_data(paths["train"], paths["label_csv"]))
  assert len(source) == 16 and source[0]["path"].endswith(".png")
  assert source.class_names[0] == "Horizontal stripes"
  # A class folder of images; audio files there are not images.
  for cls in ("cat", "dog"):
    os.makedirs(tmp_path / "folder" / cls)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "folder" / cls / "a.JPEG",
                                                        format="JPEG")
    (tmp_path / "folder" / cls / "b.wav").write_bytes(b"")
  folder = sources.open_source(_image_data(str(tmp_path / "folder"), data_format="folder"))
  assert len(folder) == 2 and folder.class_names == ["cat", "dog"]
  # An audio manifest (entries name "wav") read as images names the missing field.
  wav_manifest = tmp_path / "audio.json"
  wav_manifest.write_text(json.dumps({"data": [{"wav": "x.wav", "labels": "/demo/disc"}]}))
  with pytest.raises(sources.DataError, match="entry 0: 'image' must be a non-empty string"):
    sources.open_source(_image_data(str(wav_manifest), paths["label_csv"]))


def test_images_build_into_a_tfds_set_that_trains_as_its_files_do(tmp_path):
  from bridle_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel
  paths = demo_images.write_demo_images(str(tmp_path / "corpus"), images_per_class=2,
                                        eval_images_per_class=1)
  with open(os.path.join(paths["image_dir"], "train_disc_0001.png"), "wb") as f:
    f.write(b"not an image")
  # From the JSON manifest (with its label csv) and from a class folder (without one).
  built = tfds_builder.build_array_record(paths["train"], paths["label_csv"],
                                          str(tmp_path / "tfds"), modality="image",
                                          clips_per_shard=5)
  assert built.endswith(os.path.join("image_manifest", "train", "1.0.0"))
  folder = tmp_path / "folder"
  for record in sources.open_source(_image_data(paths["train"], paths["label_csv"])):
    os.makedirs(folder / record["path"].split("_")[-2], exist_ok=True)
    os.link(record["path"], folder / record["path"].split("_")[-2] / os.path.basename(
        record["path"]))
  tfds_builder.main([f"--manifest={folder}", f"--data_dir={tmp_path / 'tfds'}",
                     "--modality=image", "--name=folder"])
  for dataset_dir, expected in (
      (built, sources.open_source(_image_data(paths["train"], paths["label_csv"]))),
      (str(tmp_path / "tfds" / "image_manifest" / "folder" / "1.0.0"),
       sources.open_source(_image_data(str(folder), data_format="folder")))):
    data = _image_data(dataset_dir, data_format="tfds")
    source = sources.open_source(data)
    assert source.modality == "image" and source.class_names == expected.class_names
    kept = [r for r in expected if not r["path"].endswith("train_disc_0001.png")]
    assert len(source) == len(kept) == 15  # the broken file was left out
    for ours, theirs in zip(source, kept):
      assert ours["path"] == theirs["path"] and list(ours["labels"]) == list(theirs["labels"])
      with open(theirs["path"], "rb") as f:
        assert ours["audio"] == f.read()  # stored as encoded
    # Evaluation batches equal those of the files.
    batches = [next(iter(pipeline.build_dataset(s, data, global_batch_size=4, seed=0,
                                                num_epochs=1, train=False)))
               for s in (source, sources.PackedSource(
                   [r["path"] for r in kept], [r["labels"] for r in kept], [-1] * 15,
                   sources.LabelMap(tuple(expected.label_ids), tuple(expected.class_names))))]
    np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])
  # A set read as the other modality is refused, naming it.
  with pytest.raises(sources.DataError, match=f"data.manifest: {built} holds image files, and "
                     "data.modality is 'audio'"):
    sources.open_source(ml_collections.ConfigDict({"format": "tfds", "manifest": built,
                                                   "modality": "audio"}))


def test_pipeline_batches_uint8_crops_and_skips_unreadable_images(tmp_path):
  paths = demo_images.write_demo_images(str(tmp_path / "corpus"), images_per_class=2,
                                        eval_images_per_class=1)
  broken = os.path.join(paths["image_dir"], "train_disc_0000.png")
  with open(broken, "wb") as f:
    f.write(b"\x89PNG broken")
  data = _image_data(paths["train"], paths["label_csv"])
  source = sources.open_source(data)
  batches = list(pipeline.build_dataset(source, data, global_batch_size=5, seed=0,
                                        num_epochs=1, train=True, num_workers=0))
  assert sum(b["skipped"].sum() for b in batches) == 1
  assert sum(len(b["image"]) for b in batches) == 15  # 16 images, one unreadable
  first = batches[0]
  assert first["image"].shape == (5, 64, 64, 3) and first["image"].dtype == np.uint8
  assert first["label"].shape == (5, 8)
  # Evaluation batches: the deterministic centre crop of each image, in source order.
  plain = next(iter(pipeline.build_dataset(source, data, global_batch_size=4, seed=0,
                                           num_epochs=1, train=False)))
  expected = image.eval_crop(image.load_image(source[0]["path"]), 64)
  np.testing.assert_array_equal(plain["image"][0], expected)


@pytest.mark.parametrize("field,value,expected", [
    ("model.in_chans", 1, "model.in_chans: images are RGB (3 channels), got 1"),
    ("data.image_size", 60, "data.image_size: 60 pixels is not divisible by model.patch_size=8"),
    ("data.crop_scale", (0.5, 0.2), "data.crop_scale: must be (low, high)"),
    ("data.std", (0.2, 0.2), "data.std: needs one value per RGB channel"),
    ("model.mask_2d", True, "model.mask_2d: time/frequency masking is for audio"),
    ("encoder_phase.reuse_codes", True, "encoder_phase.reuse_codes: needs unaugmented input, "
     "and image pretraining crops at random"),
    ("data.modality", "video", "data.modality: 'video' is not one of 'audio', 'image'"),
    ("data.randaugment", "rand-m9", "data.randaugment: RandAugment policy 'rand-m9': needs"),
    ("data.reprob", 1.5, "data.reprob: is a probability, got 1.5"),
    ("data.modality", "audio", "data.modality: 'audio' needs data.sample_rate, "
     "data.num_mel_bins, data.target_length; start from configs/audio.py"),
    ("model.pos_table_frames", 256, "model.pos_table_frames: is for audio clips shorter"),
])
def test_invalid_image_config_fields_are_named(field, value, expected):
  config = image_config.get_config("demo")
  node, key = config, field
  while "." in key:
    head, key = key.split(".", 1)
    node = node[head]
  node[key] = value
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(config)
  assert str(error.value).startswith(expected)


def test_an_audio_config_switched_to_images_names_the_missing_fields():
  from configs import audio  # pylint: disable=import-outside-toplevel
  config = audio.get_config("demo")
  config.data.modality = "image"
  with pytest.raises(config_validation.ConfigError, match=r"^data.modality: 'image' needs "
                     r"data.image_size, data.crop_scale, data.crop_ratio, data.hflip; start "
                     r"from configs/image.py"):
    config_validation.validate_config(config)


def test_the_image_recipe_is_the_reference_one():
  c = image_config.get_config()
  assert (c.data.image_size, c.model.patch_size, c.model.in_chans) == (224, 16, 3)
  assert (c.data.mean, c.data.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert (c.data.crop_scale, c.data.hflip) == ((0.2, 1.0), True)
  assert (c.model.decoder.mode, c.model.decoder.width, c.model.decoder.depth) == (0, 512, 16)
  assert (c.encoder_phase.epochs, c.encoder_phase.warmup_epochs, c.encoder_phase.lr) == (
      200, 10, 5e-4)
  assert (c.tokenizer_phase.epochs, c.tokenizer_phase.warmup_epochs, c.tokenizer_phase.lr) == (
      50, 2, 2e-4)
  c.data.manifest = "/data/train"
  config_validation.validate_config(c)


@pytest.mark.parametrize("variant,expected", [
    ("in1k", ("finetune", 5e-4, 200, 5, 1024, True)),
    ("in1k_probe", ("probe", 8e-3, 200, 10, 256, False))])
def test_the_image_finetune_recipes_are_the_reference_ones(variant, expected):
  from bridle_jax.evaluate import finetune  # pylint: disable=import-outside-toplevel
  from configs import finetune_image  # pylint: disable=import-outside-toplevel
  c = finetune_image.get_config(variant)
  ft = c.finetune
  assert (c.mode, ft.lr, ft.epochs, ft.warmup_epochs, ft.batch_size,
          ft.learn_pos_embed) == expected
  assert (ft.loss, ft.layer_decay, ft.weight_decay, ft.min_lr, ft.drop_path) == (
      "ce", 0.75, 5e-4, 1e-6, 0.1)
  assert (c.data.crop_scale, c.data.randaugment, c.data.reprob) == (
      (0.08, 1.0), "rand-m9-mstd0.5-inc1", 0.25)
  c.data.manifest, c.data.eval_manifest = "/data/train", "/data/val"
  finetune.validate(c, c.mode)
  config_validation.validate_config(c)
  with pytest.raises(ValueError, match="unknown variant 'in22k'"):
    finetune_image.get_config("in22k")


def test_partial_and_absent_eval_batches_pad_with_a_row_mask():
  from bridle_jax.evaluate import finetune  # pylint: disable=import-outside-toplevel

  class Source(list):
    class_names = ["a", "b", "c", "d"]
  d = image_config.get_config("demo").data
  batch = {"image": np.full((3, 64, 64, 3), 9, np.uint8),
           "label": np.eye(4, dtype=np.float32)[[1, 2, 3]]}
  padded = finetune._padded_batch(batch, 5, Source(), d)  # pylint: disable=protected-access
  assert sorted(padded) == ["image", "label", "mask"]
  assert padded["image"].shape == (5, 64, 64, 3) and padded["image"].dtype == np.uint8
  assert (padded["image"][:3] == 9).all() and not padded["image"][3:].any()
  np.testing.assert_array_equal(padded["label"][:3], batch["label"])
  assert not padded["label"][3:].any()
  np.testing.assert_array_equal(padded["mask"], [True, True, True, False, False])
  empty = finetune._padded_batch(None, 5, Source(), d)  # pylint: disable=protected-access
  assert empty["image"].shape == (5, 64, 64, 3) and not empty["mask"].any()


def test_demo_images_are_deterministic_and_reused(tmp_path):
  a = demo_images.write_demo_images(str(tmp_path / "a"), images_per_class=2,
                                    eval_images_per_class=1, seed=3)
  b = demo_images.write_demo_images(str(tmp_path / "b"), images_per_class=2,
                                    eval_images_per_class=1, seed=3)
  names = sorted(os.listdir(a["image_dir"]))
  assert len(names) == 24
  for name in names:
    with open(os.path.join(a["image_dir"], name), "rb") as f, \
         open(os.path.join(b["image_dir"], name), "rb") as g:
      assert f.read() == g.read()
  stamp = tmp_path / "a" / "demo_corpus.json"
  mtime = stamp.stat().st_mtime_ns
  demo_images.write_demo_images(str(tmp_path / "a"), images_per_class=2,
                                eval_images_per_class=1, seed=3)
  assert stamp.stat().st_mtime_ns == mtime  # complete: not rewritten
  pictures = [np.asarray(Image.open(os.path.join(a["image_dir"], n))) for n in names]
  assert all(p.ndim == 3 and p.shape[2] == 3 and 56 <= min(p.shape[:2]) for p in pictures)
  assert len({p.tobytes() for p in pictures}) == len(pictures)


# ---------------------------------------------------------------- export layout

def _zeros_tree(config):
  abstract = nn.unbox(workdir_lib.abstract_pretrained(state_lib.build_models(config)))
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)


def test_vitb_image_export_has_the_official_image_shapes_and_parameter_counts():
  """official_impl.md §7.4: image encoder_decoder 137,258,240 (decoder 51,459,584) and
  tokenizer 109,249,536 parameters (codebook weights in, EMA buffers out)."""
  config = image_config.get_config()
  state = to_torch.pretrain_state_dict(config, _zeros_tree(config))
  shapes = {k: v.shape for k, v in state.items()}
  assert shapes["encoder_decoder.pos_embed"] == (1, 197, 768)
  assert shapes["encoder_decoder.decoder_pos_embed"] == (1, 197, 512)
  assert shapes["encoder_decoder.patch_embed.proj.weight"] == (768, 3, 16, 16)
  assert shapes["tokenizer.pos_embed"] == (1, 197, 768)
  assert shapes["tokenizer.estimator_pos_embed"] == (1, 196, 768)
  assert shapes["encoder_decoder.decoder_blocks.15.attn.qkv.weight"] == (1536, 512)
  # MAE's table: token k = 14 row + col; first half encodes the column, second the row.
  table = state["encoder_decoder.pos_embed"][0]
  np.testing.assert_array_equal(table[0], 0.0)
  k = np.arange(196)
  np.testing.assert_allclose(table[1:, :384], pos_embed.sincos_1d(k % 14, 384), atol=1e-6)
  np.testing.assert_allclose(table[1:, 384:], pos_embed.sincos_1d(k // 14, 384), atol=1e-6)
  buffers = ("cluster_size_ema", "embed_ema", "initted")

  def count(prefix, skip=()):
    return sum(v.size for k, v in state.items()
               if k.startswith(prefix) and not k.endswith(buffers) and k not in skip)

  assert count("encoder_decoder.") == 137_258_240
  decoder = sum(v.size for k, v in state.items()
                if k.startswith(("encoder_decoder.decoder", "encoder_decoder.mask_token")))
  assert decoder == 51_459_584
  assert count("tokenizer.") == 109_249_536
  finetune = to_torch.finetune_state_dict(config, _zeros_tree(config)["params"], 1000)
  assert finetune["pos_embed"].shape == (1, 197, 768) and finetune["head.weight"].shape == (
      1000, 768)


def test_image_export_round_trips_and_matches_the_torch_reference():
  torch = pytest.importorskip("torch")
  from bridle_jax.convert import torch_reference  # pylint: disable=import-outside-toplevel
  config = image_config.get_config("demo")
  models = state_lib.build_models(config)
  params = nn.unbox(jax.jit(lambda rng: state_lib.init_params(models, rng))(
      jax.random.key(0, impl="unsafe_rbg")))
  spec = models.quantizer
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  z = models.tokenizer.apply({"params": params["tokenizer"]}, x, cold_start=False)
  codebooks = quantizer.kmeans_init(spec, quantizer.init(spec, jax.random.PRNGKey(1)), z,
                                    jax.random.PRNGKey(2))
  tree = {"params": jax.tree.map(np.asarray, params), "codebooks": codebooks}
  features, _, ids_restore = models.encoder.apply({"params": params["encoder"]}, x)
  ours = {"features": features,
          "logits": models.decoder.apply({"params": params["decoder"]}, features, ids_restore),
          "z": z, "codes": quantizer.quantize(spec, codebooks, z)[1]}

  exported = to_torch.pretrain_state_dict(config, tree)
  imported = from_torch.from_state_dict(exported, config)
  assert jax.tree.structure(imported) == jax.tree.structure(tree)
  for ours_leaf, back in zip(jax.tree.leaves(tree), jax.tree.leaves(imported)):
    np.testing.assert_array_equal(np.asarray(ours_leaf), np.asarray(back))
  model = torch_reference.pretrain_model(config).eval()
  state = {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}
  result = model.load_state_dict(state, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    theirs = {"features": model.encoder_decoder.forward_encoder_no_mask(nchw),
              "logits": model.encoder_decoder(nchw, mask_ratio=0.0)[0],
              "z": model.tokenizer.encode(nchw, False)}
    theirs["codes"] = model.tokenizer.quantizer(theirs["z"])[1]
  for name, value in ours.items():
    value, other = np.asarray(value), theirs[name].numpy()
    assert value.shape == other.shape, name
    if name == "codes":
      np.testing.assert_array_equal(value, other)
    else:
      assert np.abs(value - other).max() <= 1e-5 * np.abs(other).max(), name


# ---------------------------------------------------------------- command line

def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=cpu_env.subprocess_env(1), capture_output=True, text=True,
                        timeout=600)


def test_image_demo_pretrains_embeds_and_exports(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  run = _cli("bridle_jax.main", "--config=configs/image.py:demo", f"--workdir={workdir}",
             "--config.encoder_phase.steps=3", "--config.tokenizer_phase.steps=3",
             "--config.checkpoint_every=2")
  assert run.returncode == 0, run.stderr[-3000:]
  assert workdir_lib.finished_phases(workdir) == ["p1_encoder", "p2_tokenizer", "p3_encoder"]
  with open(os.path.join(workdir, "summary.json")) as f:
    verdict = json.load(f)["verdict"]
  assert verdict["train_clips"] == 320 and verdict["eval_clips"] == 80
  assert 0.0 <= verdict["pretrained_accuracy"] <= 1.0
  assert len(verdict["codebook_usage"]["fraction_used"]) == 4

  # In this process from here on, but for the fine-tuning commands.
  from bridle_jax.evaluate import embeddings  # pylint: disable=import-outside-toplevel
  from bridle_jax.evaluate import finetune  # pylint: disable=import-outside-toplevel
  corpus = os.path.join(workdir, "demo_images")
  output = str(tmp_path / "emb.npz")
  report = embeddings.embed_manifest(workdir, f"{corpus}/eval.json", output,
                                     label_csv=f"{corpus}/class_labels_indices.csv",
                                     include_patch=True)
  assert report["failed"] == 0
  with np.load(output) as npz:
    assert npz["pooled"].shape == (80, 64) and npz["patch"].shape == (80, 64, 64)
    assert np.isfinite(npz["pooled"]).all() and npz["labels"].shape == (80, 8)

  # Arrays of any size embed as files do.
  embedder = embeddings.Embedder.from_workdir(workdir)
  with np.load(output) as npz:
    first = np.asarray(Image.open(str(npz["paths"][0])).convert("RGB"))
    np.testing.assert_allclose(embedder.embed_images([first])["pooled"][0], npz["pooled"][0],
                               rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="pretrained on image input, not audio"):
    embedder.embed_waveforms([np.zeros(16000, np.float32)], sample_rate=16000)

  # A linear probe of the image encoder; an audio recipe is refused.
  probe = _cli("bridle_jax.main", "--config=configs/finetune_image.py:probe_demo",
               f"--workdir={tmp_path / 'probe'}", f"--config.init_from={workdir}",
               "--config.finetune.steps=6", "--config.finetune.eval_every_epochs=100")
  assert probe.returncode == 0, probe.stderr[-3000:]
  with open(tmp_path / "probe" / "summary.json") as f:
    result = json.load(f)["runs"]["probe"]
  assert result["eval_clips"] == 80 and result["train_clips"] == 320
  assert 0.0 <= result["final"]["accuracy"] <= 1.0
  from configs import finetune_audio  # pylint: disable=import-outside-toplevel
  audio_probe = finetune_audio.get_config("probe_demo")
  audio_probe.init_from = workdir
  with pytest.raises(ValueError, match=f"^init_from: {workdir} pretrained on image input, "
                     "and this config reads audio; use configs/finetune_image.py"):
    finetune.adopt_pretrained_architecture(audio_probe)
  # The ImageNet recipe (224 px, ViT-B) adopts the encoder's architecture and picture size.
  from configs import finetune_image  # pylint: disable=import-outside-toplevel
  in1k_probe = finetune_image.get_config("in1k_probe")
  in1k_probe.init_from = workdir
  in1k_probe.data.std = (0.5, 0.5, 0.5)
  finetune.adopt_pretrained_architecture(in1k_probe)
  assert (in1k_probe.data.image_size, in1k_probe.model.patch_size,
          in1k_probe.model.width) == (64, 8, 64)
  assert "data.std: (0.5, 0.5, 0.5), but" in caplog.text and "data.mean" not in caplog.text
  # Fine-tuning (RandAugment, random erasing, a learned pos_embed).
  finetune = _cli("bridle_jax.main", "--config=configs/finetune_image.py:finetune_demo",
                  f"--workdir={tmp_path / 'finetune'}", f"--config.init_from={workdir}",
                  "--config.finetune.steps=6", "--config.finetune.eval_every_epochs=100")
  assert finetune.returncode == 0, finetune.stderr[-3000:]
  with open(tmp_path / "finetune" / "summary.json") as f:
    assert json.load(f)["runs"]["finetune"]["eval_clips"] == 80

  torch = pytest.importorskip("torch")
  from bridle_jax.convert import torch_reference  # pylint: disable=import-outside-toplevel
  summary = to_torch.export(workdir, str(tmp_path / "bridle.pth"))
  assert summary["finetune"]["num_classes"] == 1000
  table = pos_embed.image_pos_embed(8, 8, 64)
  for run, learned in (("probe", False), ("finetune", True)):
    output = str(tmp_path / f"{run}.pth")
    to_torch.export(str(tmp_path / run), output)
    state = torch.load(output, weights_only=True)["model"]
    assert tuple(state["head.weight"].shape) == (8, 64)
    assert tuple(state["patch_embed.proj.weight"].shape) == (64, 3, 8, 8)
    exported = state["pos_embed"].numpy()[0]
    assert exported.shape == (65, 64)
    # The probe keeps the fixed table (zero CLS row); fine-tuning moved it, CLS row included.
    assert np.array_equal(exported[1:], table[1:]) != learned, run
    assert exported[0].any() == learned, run
    assert np.abs(exported - table).max() < 0.1
    # The reference fine-tuning ViT loads it strictly and gives our logits.
    saved = workdir_lib.load_config(str(tmp_path / run))
    reference = torch_reference.finetune_model(saved, num_classes=8).eval()
    loaded = reference.load_state_dict(state, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    params = workdir_lib.restore_final(
        str(tmp_path / run / "checkpoints" / f"{run}_final"))["params"]
    classifier = classifier_lib.classifier_from_config(
        saved.model, saved.finetune, classifier_lib.input_grid(saved.model, saved.data), 8)
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(classifier.apply({"params": params}, x, train=False), np.float64)
    with torch.no_grad():
      theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
