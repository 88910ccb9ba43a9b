"""Fine-tuning: layer decay, drop path, pretrained loading, samplers, probe, training, k-fold."""
import copy
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import config_validation
from bridle_jax import workdir as workdir_lib
from bridle_jax import prepare as prepare_lib
from bridle_jax.convert import from_torch
from bridle_jax.data import audio
from bridle_jax.data import demo
from bridle_jax.data import sources
from bridle_jax.evaluate import finetune
from bridle_jax.evaluate import layer_decay
from bridle_jax.models import classifier as classifier_lib
from bridle_jax.models import quantizer
from bridle_jax.models import layers
from bridle_jax.models.pos_embed import audio_pos_embed
from bridle_jax.models import vit
from bridle_jax.train import checkpoint
from bridle_jax.train import preemption
from bridle_jax.train import state as state_lib
from configs import audio as audio_config
from configs import finetune_audio

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return demo.write_demo_corpus(tmp_path_factory.mktemp("corpus"), clips_per_class=8,
                                eval_clips_per_class=2)


def _classifier(depth=2, grid=(8, 8), width=32, **kwargs):
  return classifier_lib.Classifier(grid=grid, width=width, depth=depth, num_heads=4,
                                   num_classes=10, **kwargs)


def _abstract_params(model, frames=128):
  x = jnp.zeros((1, frames, 128))
  return nn.unbox(jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0),
                                              "mask": jax.random.PRNGKey(1)}, x)["params"])


def _init(model, x, seed=0):
  return nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), x)["params"])


def test_layer_decay_multipliers_for_depth_12():
  scales = layer_decay.lr_scales(_abstract_params(_classifier(depth=12)), depth=12, decay=0.75)
  expected = {"cls_token": 0.75 ** 13, "patch_embed": 0.75 ** 13, "blocks_0": 0.75 ** 12,
              "blocks_5": 0.75 ** 7, "blocks_11": 0.75, "fc_norm": 1.0, "head": 1.0}
  for key, value in expected.items():
    leaves = jax.tree.leaves(scales[key])
    assert leaves and all(leaf == pytest.approx(value) for leaf in leaves), key
  assert set(scales) == {"cls_token", "patch_embed", "fc_norm", "head",
                         *(f"blocks_{i}" for i in range(12))}


def test_weight_decay_skips_biases_norms_and_cls_token():
  mask = layer_decay.decay_mask(_abstract_params(_classifier()))
  assert mask["cls_token"] is False
  assert mask["head"] == {"kernel": True, "bias": False}
  assert mask["fc_norm"] == {"scale": False, "bias": False}
  assert mask["blocks_1"]["attn"]["qkv"] == {"kernel": True, "bias": False}
  assert mask["blocks_1"]["mlp"]["fc1"] == {"kernel": True, "bias": False}
  assert mask["patch_embed"]["proj"] == {"kernel": True, "bias": False}


def test_drop_path_block_keeps_block_param_names_and_drops_whole_samples():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 32))
  plain = layers.Block(num_heads=4)
  params = jax.jit(plain.init)(jax.random.PRNGKey(1), x)
  block = classifier_lib.DropPathBlock(num_heads=4, drop_path=0.999)
  assert jax.tree.structure(jax.eval_shape(block.init, jax.random.PRNGKey(1), x)) == (
      jax.tree.structure(params))
  apply = jax.jit(block.apply, static_argnames="train")
  np.testing.assert_allclose(apply(params, x), jax.jit(plain.apply)(params, x), rtol=1e-6)
  dropped = apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(dropped, x)  # both branches dropped for every sample


def test_drop_path_rates_follow_the_linear_rule():
  model = _classifier(depth=4, drop_path=0.3)
  bound = model.bind({"params": _abstract_params(model)})
  np.testing.assert_allclose([block.drop_path for block in bound.blocks], [0.0, 0.1, 0.2, 0.3])


def test_classifier_takes_pretrained_encoder_on_its_own_grid():
  encoder = vit.Encoder(grid=(8, 8), width=32, depth=2, num_heads=4)
  encoder_params = _init(encoder, jnp.zeros((1, 128, 128)), seed=3)
  model = _classifier(grid=(4, 8))  # 64 frames: half the pretraining length
  params = _init(model, jnp.zeros((1, 64, 128)), seed=4)
  merged = classifier_lib.with_encoder_params(params, encoder_params)
  assert set(merged) == {"patch_embed", "cls_token", "blocks_0", "blocks_1", "fc_norm", "head"}
  for key in ("patch_embed", "cls_token", "blocks_0", "blocks_1"):
    for a, b in zip(jax.tree.leaves(merged[key]), jax.tree.leaves(encoder_params[key])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(merged["head"]["bias"], 0.0)
  assert 0 < np.std(merged["head"]["kernel"]) < 1e-4
  logits = jax.jit(model.apply)({"params": merged}, jnp.ones((2, 64, 128)))
  assert logits.shape == (2, 10) and np.isfinite(logits).all()
  with pytest.raises(ValueError, match="blocks_1"):
    classifier_lib.with_encoder_params(
        params, {**encoder_params, "blocks_1": encoder_params["norm"]})


def test_bfloat16_classifier_gives_float32_logits():
  model = _classifier(dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 128, 128))
  params = _init(model, x)
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3),
                                               params["head"]["kernel"].shape)
  logits = np.asarray(model.apply({"params": params}, x))
  assert logits.dtype == np.float32
  assert (logits != logits.astype(jnp.bfloat16).astype(np.float32)).mean() > 0.5


def test_training_masks_keep_the_expected_token_counts():
  model = _classifier(mask_t_prob=0.5, mask_f_prob=0.25)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 128))
  params = {"params": _abstract_params(model)}
  # 2-D masking keeps int(8 * 0.5) time rows x int(8 * 0.75) frequency columns.
  tokens = jax.eval_shape(functools.partial(model.apply, method=lambda m, x: m._masked(m.embed(x))),
                          params, x, rngs={"mask": jax.random.PRNGKey(2)})
  assert tokens.shape == (2, 4 * 6, 32)
  one_d = _classifier(mask_2d=False, mask_t_prob=0.25)
  tokens = jax.eval_shape(functools.partial(one_d.apply, method=lambda m, x: m._masked(m.embed(x))),
                          params, x, rngs={"mask": jax.random.PRNGKey(2)})
  assert tokens.shape == (2, 48, 32)


class _Table:
  """A minimal source: labels per clip, folds, class names."""

  def __init__(self, labels, folds=None):
    self.labels = [np.asarray(l, np.int32) for l in labels]
    self.folds = folds or [-1] * len(labels)
    self.class_names = ["a", "b", "c"]
    self.label_ids = self.class_names

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"path": f"clip{i}", "audio": b"", "labels": self.labels[i], "fold": self.folds[i]}

  def label_table(self):
    values = np.concatenate(self.labels).astype(np.int32)
    return values, np.concatenate([[0], np.cumsum([len(l) for l in self.labels])])


def test_best_evaluation_skips_nan_and_takes_the_later_of_a_tie():
  nan = float("nan")
  evals = {5: {"mAP": nan}, 10: {"mAP": 0.2}, 15: {"mAP": 0.1}, 20: {"mAP": nan}}
  assert finetune.best_step(evals, "mAP") == 10
  assert finetune.best_step({5: {"mAP": 0.3}, 10: {"mAP": 0.3}}, "mAP") == 10
  assert finetune.best_step({5: {"mAP": None}, 10: {"mAP": nan}}, "mAP") == 10


def test_sample_weights_are_ast_inverse_label_frequencies():
  table = _Table([[0], [0], [0], [1], [0, 2], []])
  weights = finetune.sample_weights(table)
  w = 1000 / (np.array([4, 1, 1]) + 0.01)
  np.testing.assert_allclose(weights, [w[0], w[0], w[0], w[1], w[0] + w[2], 0.0])


def test_weighted_source_draws_each_epoch_without_replacement_in_proportion():
  table = _Table([[0], [1], [2], [0]])
  weights = np.array([1.0, 3.0, 6.0, 0.0])
  source = finetune.WeightedSource(table, weights, epoch_size=2, num_epochs=3000, seed=5)
  epochs = np.array([source[i]["path"] for i in range(len(source))]).reshape(3000, 2)
  assert (epochs[:, 0] != epochs[:, 1]).all()  # no clip twice in an epoch
  assert not np.any(epochs == "clip3")  # zero weight
  # Sequential draws: the first is clip2 with p = 6/10; the second, after a first clip1,
  # is clip2 with p = 6/7.
  assert np.mean(epochs[:, 0] == "clip2") == pytest.approx(0.6, abs=0.03)
  after_clip1 = epochs[epochs[:, 0] == "clip1", 1]
  assert np.mean(after_clip1 == "clip2") == pytest.approx(6 / 7, abs=0.05)
  again = finetune.WeightedSource(table, weights, epoch_size=2, num_epochs=3000, seed=5)
  assert [again[i]["path"] for i in range(50)] == list(epochs.reshape(-1)[:50])
  with pytest.raises(ValueError, match="^finetune.epoch_samples=4 exceeds the 3 clips"):
    finetune.WeightedSource(table, weights, epoch_size=4, num_epochs=1, seed=5)


def test_subset_source_label_table_matches_its_records():
  table = _Table([[0], [1, 2], [], [2], [0, 1]])
  subset = finetune.SubsetSource(table, [4, 1, 2])
  values, offsets = subset.label_table()
  for i in range(len(subset)):
    np.testing.assert_array_equal(values[offsets[i]:offsets[i + 1]], subset[i]["labels"])


def _config(corpus, variant="demo", **finetune_fields):
  config = finetune_audio.get_config(variant)
  config.data.update(demo_dir="", manifest=corpus["train"], label_csv=corpus["label_csv"],
                     eval_manifest=corpus["eval"])
  config.finetune.update(finetune_fields)
  return config


def _finetuner(config, workdir, mode, num_devices):
  prepare_lib.prepare(config, str(workdir))
  config.mode = mode
  finetune.validate(config, mode)
  return finetune.Finetuner(config, str(workdir), mode, devices=jax.devices()[:num_devices])


def test_a_batch_that_does_not_split_over_the_devices_names_finetune_batch_size(corpus,
                                                                              tmp_path):
  config = _config(corpus, batch_size=12)
  with pytest.raises(ValueError, match=r"^finetune.batch_size=12 is not divisible by the 8 "
                                       r"data-parallel devices"):
    _finetuner(config, tmp_path, "finetune", num_devices=8)


def test_a_manifest_without_labels_is_refused_before_training(corpus, tmp_path):
  entries = json.loads(open(corpus["train"]).read())["data"]
  misspelt = [{"wav": os.path.join(os.path.dirname(corpus["train"]), e["wav"]),
               "label": e["labels"]} for e in entries]
  manifest = tmp_path / "train.json"
  manifest.write_text(json.dumps({"data": misspelt}))
  config = _config(corpus)
  config.data.manifest = str(manifest)
  finetuner = _finetuner(config, tmp_path / "w", "finetune", num_devices=1)
  with pytest.raises(sources.DataError, match=rf"^data.manifest: none of its {len(entries)} "
                                              "clips has a label"):
    finetuner.run()
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_linear_probe_updates_only_fc_norm_and_head(corpus, tmp_path):
  config = _config(corpus, steps=3, batch_size=16)
  tuner = _finetuner(config, tmp_path, "probe", num_devices=2)
  before = jax.device_get(tuner.initial_state(0).params)
  result = tuner.train_and_evaluate("probe", 0, tuner.source, tuner.source)
  after = jax.device_get(tuner.restore_final_params("probe"))
  for key in before:
    changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[key]),
                                                            jax.tree.leaves(after[key])))
    assert changed == (key in ("fc_norm", "head")), key
  assert 0.0 <= result["final"]["accuracy"] <= 1.0
  assert result["final"]["num_clips"] == 80


def test_finetuning_loss_falls_on_demo_data(corpus, tmp_path):
  config = _config(corpus, steps=30, lr=1e-2, warmup_epochs=0, drop_path=0.0, mask_t_prob=0.0,
                   mask_f_prob=0.0, eval_every_epochs=100)
  config.data.update(mixup=0.0, freqm=0, timem=0)
  tuner = _finetuner(config, tmp_path, "finetune", num_devices=1)
  before = jax.device_get(tuner.initial_state(0).params)
  result = tuner.train_and_evaluate("finetune", 0, tuner.source, tuner.source)
  after = jax.device_get(tuner.restore_final_params("finetune"))
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["blocks_0"]),
                                                       jax.tree.leaves(after["blocks_0"])))
  # The head starts at ~0 (std 2e-5), so the loss starts at ln(10) = 2.303 nats.
  assert result["train"]["mean_loss_last_10pct"] < 2.2, result["train"]
  assert result["final"]["accuracy"] > 0.15  # on its training clips


def test_a_non_finite_fine_tuning_step_leaves_the_classifier_and_is_counted(corpus, tmp_path):
  config = _config(corpus, steps=3, batch_size=16)
  tuner = _finetuner(config, tmp_path, "finetune", num_devices=1)
  step_fn = tuner.train_step_fn(3, 0)
  state = tuner.initial_state(0)
  before = jax.tree.map(np.asarray, jax.device_get((state.params, state.opt_state)))
  samples = audio.num_samples_for_frames(config.data.target_length, config.data.sample_rate)
  batch = {"waveform": np.zeros((16, samples), np.float32),
           "valid_frames": np.full(16, 128, np.int32),
           "label": np.eye(10, dtype=np.float32)[np.arange(16) % 10]}
  poisoned = dict(batch, waveform=np.full_like(batch["waveform"], np.nan))
  state, metrics = step_fn(state, tuner.device_batch(poisoned))
  assert not np.isfinite(float(metrics["loss"])) and int(state.skipped_updates) == 1
  after = jax.tree.map(np.asarray, jax.device_get((state.params, state.opt_state)))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  state, metrics = step_fn(state, tuner.device_batch(batch))
  assert np.isfinite(float(metrics["loss"])) and int(state.skipped_updates) == 1
  assert int(state.step) == 2
  # A run of another length (a fold of another size) takes the same compiled step with
  # its own schedule: at step 2 of 4 without warmup, halfway down the cosine.
  ft = config.finetune
  _, metrics = tuner.train_step_fn(4, 0)(state, tuner.device_batch(batch))
  assert float(metrics["lr"]) == pytest.approx((ft.lr + ft.min_lr) / 2, rel=1e-5)
  assert tuner._train_step._cache_size() == 1  # pylint: disable=protected-access


def test_a_run_killed_in_an_evaluation_evaluates_that_step_on_resume(corpus, tmp_path,
                                                                     monkeypatch):
  """Step 5 is an evaluation and a checkpoint step; a run that dies in its evaluation (here
  the evaluation raises) leaves no step-5 checkpoint without it, and the resumed run
  evaluates step 5."""
  config = _config(corpus, steps=10, batch_size=16, eval_every_epochs=1)  # 5 steps an epoch
  config.checkpoint_every = 5
  tuner = _finetuner(config, tmp_path, "finetune", num_devices=1)
  evaluate = finetune.Finetuner._evaluate_into  # pylint: disable=protected-access

  def dies_at_step_5(self, evals, run_id, step, params, source):
    if step == 5:
      raise OSError("killed during the evaluation")
    evaluate(self, evals, run_id, step, params, source)

  monkeypatch.setattr(finetune.Finetuner, "_evaluate_into", dies_at_step_5)
  with pytest.raises(OSError, match="killed"):
    tuner.train_and_evaluate("finetune", 0, tuner.source, tuner.source)
  monkeypatch.setattr(finetune.Finetuner, "_evaluate_into", evaluate)
  result = tuner.train_and_evaluate("finetune", 0, tuner.source, tuner.source)
  assert sorted(result["evals"], key=int) == ["5", "10"]


def test_diverging_fine_tuning_stops_past_the_threshold(corpus, tmp_path):
  """An lr that makes every update non-finite stops the run with an error naming the limit,
  instead of finishing with the initial classifier and normal-looking metrics."""
  result = _run_cli("--config=configs/finetune_audio.py:demo", f"--workdir={tmp_path}",
                    "--config.data.demo_dir=", f"--config.data.manifest={corpus['train']}",
                    f"--config.data.label_csv={corpus['label_csv']}",
                    f"--config.data.eval_manifest={corpus['eval']}", "--config.finetune.lr=1e30",
                    "--config.finetune.warmup_epochs=0", "--config.max_nonfinite_updates=2")
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.splitlines()[-1]
  assert re.match(r"error: finetune: \d+ updates had a non-finite loss or gradient "
                  r"\(max_nonfinite_updates=2\)", last), last
  assert not (tmp_path / "summary.json").exists()


def test_preempted_fine_tuning_saves_and_resumes_to_the_same_result(corpus, tmp_path):
  config = _config(corpus, steps=6, batch_size=16, eval_every_epochs=100)
  config.checkpoint_every = 100  # only the preemption and the final step save
  tuner = _finetuner(config, tmp_path / "stopped", "probe", num_devices=1)
  calls = []
  tuner.preemption.requested = lambda: calls.append(1) or len(calls) == 4
  with pytest.raises(preemption.Preempted, match="preempted at step 4/6"):
    tuner.train_and_evaluate("probe", 0, tuner.source, tuner.source)
  resumed = _finetuner(config, tmp_path / "stopped", "probe", num_devices=1)
  result = resumed.train_and_evaluate("probe", 0, resumed.source, resumed.source)
  whole = _finetuner(config, tmp_path / "whole", "probe", num_devices=1)
  expected = whole.train_and_evaluate("probe", 0, whole.source, whole.source)

  assert (result["train"]["from_step"], expected["train"]["from_step"]) == (4, 0)
  for key in ("final_loss", "mean_loss_last_10pct"):
    assert result["train"][key] == pytest.approx(expected["train"][key], rel=1e-5), key
  assert result["final"]["accuracy"] == pytest.approx(expected["final"]["accuracy"])
  with open(tmp_path / "stopped" / "history" / "probe.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, 7))


def test_a_notice_between_folds_stops_before_the_next_fold(corpus, tmp_path, monkeypatch):
  config = _config(corpus, "esc50_demo", steps=1)
  tuner = _finetuner(config, tmp_path, "finetune", num_devices=1)
  train_and_evaluate = tuner.train_and_evaluate

  def noticed_at_the_end(*args):  # SIGTERM while fold1 saved its final checkpoint
    result = train_and_evaluate(*args)
    tuner.preemption._on_signal(signal.SIGTERM, None)
    return result

  monkeypatch.setattr(tuner, "train_and_evaluate", noticed_at_the_end)
  with pytest.raises(preemption.Preempted, match="fold2: preempted before it started"):
    tuner.run()
  assert list(json.loads((tmp_path / "progress.json").read_text())["runs"]) == ["fold1"]


def _run_cli(*args):
  env = cpu_env.subprocess_env(2)
  return subprocess.run([sys.executable, "-m", "bridle_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_kfold_cli_trains_one_run_per_fold_and_averages(corpus, tmp_path):
  args = ["--config=configs/finetune_audio.py:esc50_demo", f"--workdir={tmp_path}",
          "--config.data.demo_dir=", f"--config.data.manifest={corpus['train']}",
          f"--config.data.label_csv={corpus['label_csv']}", "--config.finetune.steps=1"]
  result = _run_cli(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["mode"] == "finetune" and summary["primary_metric"] == "accuracy"
  assert sorted(summary["runs"]) == [f"fold{k}" for k in range(1, 6)]
  assert sum(run["eval_clips"] for run in summary["runs"].values()) == 80
  assert all(run["train_clips"] + run["eval_clips"] == 80 for run in summary["runs"].values())
  mean = np.mean([run["final"]["accuracy"] for run in summary["runs"].values()])
  assert summary["mean_final"]["accuracy"] == pytest.approx(mean)
  rerun = _run_cli(*args)  # finished folds are not trained again
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stderr.count("already done") == 5
  # Other settings in the same workdir are refused, not answered with the old results.
  probe = args[0].replace(":esc50_demo", ":esc50_probe_demo")
  for changed_args, field in (([*args, "--config.finetune.lr=0.5"], "finetune.lr = "),
                              ([probe, *args[1:]], "")):
    changed = _run_cli(*changed_args)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert f"its fine-tuning runs started with {field}" in changed.stderr.splitlines()[-1]


def test_shipped_finetune_configs():
  esc = finetune_audio.get_config("esc50")
  assert (esc.data.target_length, esc.finetune.lr, esc.finetune.epochs,
          esc.finetune.warmup_epochs, esc.finetune.batch_size) == (512, 2e-3, 300, 20, 64)
  assert (esc.data.mean, esc.data.std, esc.finetune.kfold, esc.finetune.loss) == (
      -6.6268077, 5.358466, True, "ce")
  as2m = finetune_audio.get_config("as2m")
  assert (as2m.finetune.lr, as2m.finetune.epochs, as2m.finetune.batch_size,
          as2m.finetune.weighted_sampler, as2m.finetune.loss) == (2e-4, 200, 256, True, "bce")
  for c in (esc, as2m, finetune_audio.get_config("as20k_probe")):
    assert (c.finetune.layer_decay, c.finetune.weight_decay, c.finetune.drop_path,
            c.finetune.min_lr, tuple(c.finetune.betas)) == (0.75, 5e-4, 0.1, 1e-6, (0.9, 0.999))
    assert (c.data.mixup, c.data.freqm, c.data.timem) == (0.5, 48, 192)
  assert finetune_audio.get_config("as20k_probe").mode == "probe"
  assert finetune_audio.get_config("sc2").data.target_length == 128
  with pytest.raises(ValueError, match="unknown variant"):
    finetune_audio.get_config("esc10")


@pytest.mark.parametrize("variant", [*finetune_audio.RECIPES, "demo", "probe_demo", "esc50_demo",
                                     "as2m_probe_demo"])
def test_every_variant_passes_validation(variant):
  config = finetune_audio.get_config(variant)
  config.data.manifest = config.data.manifest or "train.json"
  config.data.label_csv = config.data.label_csv or "labels.csv"
  config.data.eval_manifest = config.data.eval_manifest or "eval.json"
  config_validation.validate_config(config)
  finetune.validate(config, config.mode)


def test_invalid_finetune_field_is_named():
  config = finetune_audio.get_config("demo")
  config.finetune.loss = "hinge"
  with pytest.raises(config_validation.ConfigError, match="^finetune.loss: 'hinge'"):
    finetune.validate(config, "finetune")
  config = finetune_audio.get_config("as20k")
  with pytest.raises(config_validation.ConfigError, match="^data.eval_manifest: is empty"):
    finetune.validate(config, "finetune")


def test_unreadable_eval_manifest_is_named_as_such(corpus, tmp_path):
  config = finetune_audio.get_config("demo")
  config.data.update(manifest=corpus["train"], label_csv=corpus["label_csv"],
                     eval_manifest=str(tmp_path / "eval_typo.json"))
  train_source = sources.open_source(config.data)
  with pytest.raises(sources.DataError, match="^data.eval_manifest: file not found"):
    finetune._open_eval_source(config, train_source)


@pytest.mark.parametrize("variant", [v for v in finetune_audio.RECIPES])
def test_probes_do_not_mask_and_fine_tuning_masks_rows_and_columns(variant):
  ft = finetune_audio.get_config(variant).finetune
  masked = (ft.mask_t_prob, ft.mask_f_prob) != (0.0, 0.0)
  assert masked == (finetune_audio.RECIPES[variant][1] == "finetune")


def test_runs_of_a_workdir_keep_the_init_from_phase_they_started_from(corpus, tmp_path):
  """With init_phase left empty, a rerun (later folds, a resume) takes the phase the first
  run took, not one init_from finished since; summary.json names it."""
  pretrain = audio_config.get_config("demo")
  models = state_lib.build_models(pretrain)
  tree = {"params": nn.unbox(state_lib.init_params(models, jax.random.PRNGKey(0))),
          "codebooks": quantizer.init(models.quantizer, jax.random.PRNGKey(1))}
  init_from = tmp_path / "pretrained"
  from_torch.write_workdir(str(init_from), pretrain, tree, "p1_encoder", source="test")
  shutil.copytree(init_from / "checkpoints" / "p1_encoder_final",
                  init_from / "checkpoints" / "p2_tokenizer_final")
  config = _config(corpus, steps=1, eval_every_epochs=100)
  config.init_from = str(init_from)
  workdir = str(tmp_path / "finetune")
  prepare_lib.prepare(config, workdir)
  assert finetune.run(copy.deepcopy(config), workdir, "finetune")["init_phase"] == "p1_encoder"
  checkpoint.write_progress(str(init_from), {"completed": ["p1_encoder", "p2_tokenizer"]})
  assert finetune.run(copy.deepcopy(config), workdir, "finetune")["init_phase"] == "p1_encoder"
  other = str(tmp_path / "new")
  prepare_lib.prepare(config, other)
  assert finetune.run(copy.deepcopy(config), other, "finetune")["init_phase"] == "p2_tokenizer"


def test_shorter_fine_tuning_clips_take_pos_rows_of_the_pretraining_table(tmp_path):
  pretrain = audio_config.get_config("demo")  # 128 frames: 8 time patches
  workdir_lib.save_config(pretrain, str(tmp_path))
  config = finetune_audio.get_config("demo")
  config.init_from = str(tmp_path)
  config.data.target_length = 64  # 4 time patches
  finetune.adopt_pretrained_architecture(config)
  assert config.model.pos_table_frames == 128
  grid = classifier_lib.input_grid(config.model, config.data)
  model = classifier_lib.classifier_from_config(config.model, config.finetune, grid, 10)
  x = jnp.zeros((1, 64, config.data.num_mel_bins))
  params = _init(model, x)
  bias = params["patch_embed"]["proj"]["bias"]
  params["patch_embed"]["proj"]["bias"] = jnp.zeros_like(bias)
  # Zero input and zero conv bias: the embedded tokens are the fixed pos rows.
  pos = model.apply({"params": params}, x, method=model.embed)[0]
  full = audio_pos_embed(8, grid[1], config.model.width, config.model.pos_grid, cls=False)
  start = (8 - 4) * grid[1] // 2 - 1  # the reference's rows: centred, one token early
  np.testing.assert_array_equal(pos, full[start:start + 4 * grid[1]])
