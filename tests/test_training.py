"""The training engine: losses fall, frozen parts stay frozen, sharding, checkpoints, resume."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bridle_jax import driver
from bridle_jax import prepare as prepare_lib
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import demo
from bridle_jax.evaluate import verdict
from bridle_jax.train import preemption
from configs import audio as audio_config

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return demo.write_demo_corpus(tmp_path_factory.mktemp("corpus"), clips_per_class=8,
                                eval_clips_per_class=1)


def _config(corpus, workdir, rounds=("encoder", "tokenizer"), steps=16, **mesh):
  config = audio_config.get_config("demo")
  config.data.demo_dir = ""
  config.data.manifest = corpus["train"]
  config.data.label_csv = corpus["label_csv"]
  config.rounds = rounds
  for kind in ("encoder", "tokenizer", "joint"):
    config[f"{kind}_phase"].steps = steps
  config.mesh.update(mesh)
  prepare_lib.prepare(config, str(workdir))
  return config


def _train(trainer, run, num_steps):
  """Runs `num_steps` steps of a set-up phase; returns the losses."""
  losses = []
  for step in range(num_steps):
    batch = trainer.device_batch(run.next_batch())
    run.state, metrics, _ = run.step_fn(step)(run.state, batch)
    losses.append(float(metrics["loss"]))
  return losses


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _assert_trees_differ(a, b):
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_losses_fall_and_frozen_parts_stay_frozen(corpus, tmp_path):
  # One device: the tests below check that eight train alike.
  config = _config(corpus, tmp_path, rounds=("encoder", "tokenizer", "joint"), steps=30)
  trainer = driver.Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  encoder, tokenizer, joint = driver.phases(config)

  run = trainer.setup_phase(encoder, None)
  assert run.cold_start
  tokenizer_before = _host((run.state.params["tokenizer"], run.state.codebooks))
  encoder_before = _host(run.state.params["encoder"])
  losses = _train(trainer, run, 30)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  _assert_trees_equal(tokenizer_before, _host((run.state.params["tokenizer"], run.state.codebooks)))
  _assert_trees_differ(encoder_before, _host(run.state.params["encoder"]))

  run = trainer.setup_phase(tokenizer, _host_handoff(run))
  assert not run.cold_start
  encoder_before = _host((run.state.params["encoder"], run.state.params["decoder"]))
  tokenizer_before = _host((run.state.params["tokenizer"], run.state.codebooks.codebooks))
  losses = _train(trainer, run, 30)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  _assert_trees_equal(encoder_before,
                      _host((run.state.params["encoder"], run.state.params["decoder"])))
  _assert_trees_differ(tokenizer_before,
                       _host((run.state.params["tokenizer"], run.state.codebooks.codebooks)))
  # No gradient reaches the cold-start projection, so (as in PyTorch's AdamW) no decay either.
  cold_start = _host(tokenizer_before[0]["cold_start_encoder"])
  _assert_trees_equal(cold_start, _host(run.state.params["tokenizer"]["cold_start_encoder"]))

  run = trainer.setup_phase(joint, _host_handoff(run))
  losses = _train(trainer, run, 30)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses
  _assert_trees_equal(cold_start, _host(run.state.params["tokenizer"]["cold_start_encoder"]))


def _host_handoff(run):
  return {"params": run.state.params, "codebooks": run.state.codebooks}


def _short_run(corpus, workdir, devices, num_steps=3, **mesh):
  """Cold-start encoder then tokenizer steps; returns losses and final codebooks."""
  config = _config(corpus, workdir, **mesh)
  trainer = driver.Trainer(config, str(workdir), devices=devices)
  encoder, tokenizer = driver.phases(config)
  run = trainer.setup_phase(encoder, None)
  losses = _train(trainer, run, num_steps)
  run = trainer.setup_phase(tokenizer, _host_handoff(run))
  losses += _train(trainer, run, num_steps)
  return np.array(losses), _host(run.state.codebooks.codebooks), run.state


@pytest.fixture(scope="module")
def one_device_run(corpus, tmp_path_factory):
  losses, codebooks, _ = _short_run(corpus, tmp_path_factory.mktemp("one"), jax.devices()[:1])
  return losses, codebooks


def test_eight_devices_match_one(corpus, one_device_run, tmp_path):
  """Data, FSDP and model parallel at once: each axis's collectives are in the steps."""
  losses_1, codebooks_1 = one_device_run
  losses_8, codebooks_8, state_8 = _short_run(corpus, tmp_path / "eight", jax.devices(),
                                              data=2, fsdp=2, model=2)
  np.testing.assert_allclose(losses_8, losses_1, rtol=2e-4)
  np.testing.assert_allclose(codebooks_8, codebooks_1, atol=2e-5)
  kernel = state_8.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # (embed, mlp)
  assert len(kernel.sharding.device_set) == 8
  assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)


def test_a_run_with_another_lr_and_length_reuses_the_compiled_step(corpus, tmp_path):
  """The lr schedule is an input of the step, not constants in it: an lr sweep or a longer
  rerun loads the step from the compilation cache instead of compiling it again."""
  cache_events, lrs = [], []

  def listener(name, **kwargs):
    if name in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
      cache_events.append(name.rsplit("_", 1)[-1])

  jax.monitoring.register_event_listener(listener)
  try:
    for steps, lr in ((2, 1e-3), (5, 3e-4)):
      workdir = tmp_path / f"steps{steps}"
      config = _config(corpus, workdir, rounds=("tokenizer",), steps=steps)
      config.tokenizer_phase.update(lr=lr, min_lr=lr / 10, warmup_epochs=0)
      config.compile_cache_dir = str(tmp_path / "xla")  # shared, unless the process names one
      prepare_lib.prepare(config, str(workdir))
      trainer = driver.Trainer(config, str(workdir), devices=jax.devices()[:1])
      run = trainer.setup_phase(driver.phases(config)[0], None)
      batch = trainer.device_batch(run.next_batch())
      cache_events.clear()
      run.state, metrics, _ = run.step_fn(0)(run.state, batch)
      lrs.append(float(metrics["lr"]))
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert cache_events == ["hits"]  # the second run's step was compiled by the first
  assert lrs == pytest.approx([1e-3, 3e-4])  # each with its own schedule (step 0: base lr)


def test_checkpoint_round_trip_restores_state_and_data_position(corpus, tmp_path):
  config = _config(corpus, tmp_path, rounds=("tokenizer",))
  phase, = driver.phases(config)
  trainer = driver.Trainer(config, str(tmp_path))
  run = trainer.setup_phase(phase, None)
  _train(trainer, run, 4)
  run.checkpointer.save(4, run.state, run.iterator.get_state(), force=True)
  run.checkpointer.wait()
  saved = _host(run.state)
  upcoming = [run.next_batch() for _ in range(3)]

  resumed = driver.Trainer(config, str(tmp_path)).setup_phase(phase, None)
  assert int(resumed.state.step) == 4
  _assert_trees_equal(saved, _host(resumed.state))
  for want in upcoming:
    got = resumed.next_batch()
    np.testing.assert_array_equal(got["waveform"], want["waveform"])


def test_a_notice_between_phases_stops_before_the_next_one(corpus, tmp_path, monkeypatch):
  config = _config(corpus, tmp_path, steps=2)
  trainer = driver.Trainer(config, str(tmp_path))
  run_phase = trainer.run_phase

  def noticed_at_the_end(phase, handoff):  # SIGTERM while p1 saved its final checkpoint
    result = run_phase(phase, handoff)
    trainer.preemption._on_signal(signal.SIGTERM, None)
    return result

  monkeypatch.setattr(trainer, "run_phase", noticed_at_the_end)
  with pytest.raises(preemption.Preempted, match="p2_tokenizer: preempted before it "
                                                        "started; rerun the same command"):
    trainer.run()
  progress = json.loads((tmp_path / "progress.json").read_text())
  assert progress["completed"] == ["p1_encoder"]
  assert not workdir_lib.has_phase_checkpoint(str(tmp_path), "p2_tokenizer")


def test_a_notice_after_the_last_phase_stops_before_the_demo_verdict(corpus, tmp_path,
                                                                      monkeypatch):
  config = _config(corpus, tmp_path, rounds=("encoder",), steps=2)
  config.data.demo_dir = str(tmp_path / "demo_data")  # a demo run: the verdict follows
  run = driver.Trainer.run

  def noticed_at_the_end(self):
    result = run(self)
    self.preemption._on_signal(signal.SIGTERM, None)  # pylint: disable=protected-access
    return result

  monkeypatch.setattr(driver.Trainer, "run", noticed_at_the_end)
  monkeypatch.setattr(verdict, "run_verdict", lambda *args: pytest.fail("verdict ran"))
  with pytest.raises(preemption.Preempted, match="the demo verdict: preempted before it ran"):
    driver.train(config, str(tmp_path))


@pytest.mark.parametrize("field,value,expected", [
    ("tokenizer_phase.batch_size", 12,
     r"^tokenizer_phase.batch_size=12 is not divisible by the 8 data-parallel devices"),
    ("tokenizer_phase.grad_accum", 4,
     r"^tokenizer_phase.grad_accum=4 splits tokenizer_phase.batch_size=16 into micro-batches "
     r"of 4, which the 8 data-parallel devices"),
])
def test_a_later_phases_batch_is_refused_before_the_first_phase_runs(
    corpus, tmp_path, monkeypatch, field, value, expected):
  config = _config(corpus, tmp_path, steps=2)
  config.tokenizer_phase.batch_size = 16
  section, name = field.split(".")
  config[section][name] = value
  trainer = driver.Trainer(config, str(tmp_path))
  assert len(trainer.mesh.devices.flat) == 8
  monkeypatch.setattr(trainer, "run_phase", lambda *args: pytest.fail("a phase ran"))
  with pytest.raises(ValueError, match=expected):
    trainer.run()


def _cli(workdir, corpus, *overrides):
  env = cpu_env.subprocess_env(1)
  args = [sys.executable, "-m", "bridle_jax.main", "--config=configs/audio.py:demo",
          f"--workdir={workdir}", "--config.data.demo_dir=",
          f"--config.data.manifest={corpus['train']}",
          f"--config.data.label_csv={corpus['label_csv']}",
          "--config.rounds=('encoder','tokenizer')", "--config.encoder_phase.steps=12",
          "--config.tokenizer_phase.steps=12", "--config.checkpoint_every=4",
          "--config.log_every=4", "--config.usage_every=4", *overrides]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  process = _cli(workdir, corpus)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  return workdir


def test_demo_run_leaves_checkpoints_events_plots_and_summary(uninterrupted):
  summary = json.loads((uninterrupted / "summary.json").read_text())
  assert list(summary["phases"]) == ["p1_encoder", "p2_tokenizer"]
  assert summary["phases"]["p1_encoder"]["cold_start"]
  for phase_id in summary["phases"]:
    assert (uninterrupted / "plots" / f"{phase_id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(uninterrupted / "tensorboard" / phase_id)
    assert sorted(os.listdir(uninterrupted / "checkpoints" / phase_id)) == ["12", "4", "8"]
    assert os.listdir(uninterrupted / "checkpoints" / f"{phase_id}_final") == ["12"]
  progress = json.loads((uninterrupted / "progress.json").read_text())
  assert progress["completed"] == ["p1_encoder", "p2_tokenizer"]


def test_init_from_starts_from_another_workdirs_last_phase(corpus, uninterrupted, tmp_path):
  config = _config(corpus, tmp_path, rounds=("encoder",))
  config.init_from = str(uninterrupted)
  trainer = driver.Trainer(config, str(tmp_path))
  phase, = driver.phases(config)
  start = trainer._starting_point(phase)  # pylint: disable=protected-access
  final = trainer.load_handoff(str(uninterrupted / "checkpoints" / "p2_tokenizer_final"))
  _assert_trees_equal(_host(start), _host(final))
  run = trainer.setup_phase(phase, start)
  _assert_trees_equal(_host(run.state.params), _host(final["params"]))
  _assert_trees_equal(_host(run.state.codebooks), _host(final["codebooks"]))


def test_a_resumed_run_keeps_the_init_from_phases_it_started_from(corpus, uninterrupted,
                                                                   tmp_path):
  """init_from finishing a tokenizer phase after this run started must not turn its later
  encoder phases (or a resumed one) away from the cold-start tokenizer."""
  init_from = tmp_path / "init_from"
  shutil.copytree(uninterrupted, init_from)
  progress = json.loads((init_from / "progress.json").read_text())
  (init_from / "progress.json").write_text(json.dumps(dict(progress, completed=["p1_encoder"])))
  config = _config(corpus, tmp_path / "run", rounds=("encoder",), steps=2)
  config.init_from = str(init_from)
  driver.Trainer(config, str(tmp_path / "run")).run()
  (init_from / "progress.json").write_text(json.dumps(progress))  # p2_tokenizer finished since
  config.rounds = ("encoder", "encoder")
  trainer = driver.Trainer(config, str(tmp_path / "run"))
  assert trainer.init_from_phases == ["p1_encoder"]
  assert trainer.uses_cold_start(driver.phases(config)[1])
  assert verdict._uses_cold_start(str(tmp_path / "run"), config)  # pylint: disable=protected-access


def test_load_pretrained_reads_the_last_finished_phase(uninterrupted):
  config, models, pretrained = workdir_lib.load_pretrained(str(uninterrupted))
  assert tuple(config.rounds) == ("encoder", "tokenizer")
  assert models.quantizer.codebook_size == config.model.quantizer.codebook_size
  trainer_like = workdir_lib.load_pretrained(str(uninterrupted), "p2_tokenizer")[2]
  _assert_trees_equal(_host(pretrained), _host(trainer_like))
  first = workdir_lib.load_pretrained(str(uninterrupted), "p1_encoder")[2]
  _assert_trees_differ(_host(first["params"]["tokenizer"]), _host(pretrained["params"]["tokenizer"]))
  with pytest.raises(FileNotFoundError, match="not finished"):
    workdir_lib.load_pretrained(str(uninterrupted), "p3_encoder")


def test_load_pretrained_drops_the_runs_speed_settings(uninterrupted, tmp_path):
  """A run trained with cuDNN attention, the window kernel, remat, a bf16 residual
  stream and the tanh GELU embeds anywhere, without remat, with a float32 stream and
  the exact GELU."""
  copy = tmp_path / "run"
  shutil.copytree(uninterrupted, copy)
  saved = json.loads((copy / "config.json").read_text())
  saved["model"].update(attention_impl="cudnn", remat="full", residual_stream_dtype="compute",
                        gelu="tanh")
  saved["model"]["decoder"]["attention_impl"] = "pallas"
  (copy / "config.json").write_text(json.dumps(saved))
  config, models, _ = workdir_lib.load_pretrained(str(copy))
  assert (config.model.attention_impl, config.model.remat) == ("auto", "none")
  assert config.model.decoder.attention_impl == "auto"
  assert (models.encoder.attention_impl, models.encoder.remat) == ("auto", "none")
  assert models.decoder.window_attention_impl == "auto"
  assert models.encoder.residual_stream_dtype == models.estimator.residual_stream_dtype == "float32"
  assert models.encoder.gelu == models.decoder.gelu == models.estimator.gelu == "exact"


def _wait_for(path, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def test_killed_run_resumes_to_the_same_result(corpus, uninterrupted, tmp_path):
  process = _cli(tmp_path, corpus)
  _wait_for(tmp_path / "checkpoints" / "p2_tokenizer" / "8")
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (tmp_path / "summary.json").exists()
  process = _cli(tmp_path, corpus)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == 0, stderr[-3000:]
  assert "resumed at step" in stderr
  want = json.loads((uninterrupted / "summary.json").read_text())["phases"]
  got = json.loads((tmp_path / "summary.json").read_text())["phases"]
  for phase_id in want:
    assert got[phase_id]["final_loss"] == pytest.approx(want[phase_id]["final_loss"], rel=1e-6)
    assert got[phase_id]["codebook_usage"] == want[phase_id]["codebook_usage"]
