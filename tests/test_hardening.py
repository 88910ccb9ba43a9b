"""Bad inputs, interruptions, numerical faults and config errors."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import soundfile as sf

from bridle_jax import driver
from bridle_jax import prepare as prepare_lib
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import audio
from bridle_jax.data import demo
from configs import audio as audio_config

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


def _tone(seconds, sr=SR, channels=1, freq=440.0):
  t = np.arange(int(seconds * sr)) / sr
  wave = 0.3 * np.sin(2 * np.pi * freq * t)
  return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
  """One file per kind of awkward input, and what load_audio must do with it."""
  root = tmp_path_factory.mktemp("bad")
  cases = {}

  def write(name, data, sr=SR, subtype="PCM_16", expect="decoded"):
    sf.write(root / name, data, sr, subtype=subtype)
    cases[name] = expect

  write("pcm8.wav", _tone(1), subtype="PCM_U8")
  write("pcm24.wav", _tone(1), subtype="PCM_24")
  write("float.wav", _tone(1), subtype="FLOAT")
  write("rate44k.wav", _tone(1, sr=44100), sr=44100)
  write("rate8k.wav", _tone(1, sr=8000), sr=8000)
  write("stereo.wav", _tone(1, channels=2))
  write("six_channels.wav", _tone(1, channels=6))
  write("silence.wav", np.zeros(SR))
  write("long.wav", _tone(200), expect="decoded_capped")
  nan = _tone(1)
  nan[100] = np.nan
  write("nan.wav", nan, subtype="FLOAT", expect="skipped")
  inf = _tone(1)
  inf[5] = np.inf
  write("inf.wav", inf, subtype="FLOAT", expect="skipped")
  full = (root / "pcm24.wav").read_bytes()
  (root / "truncated.wav").write_bytes(full[:1000])
  cases["truncated.wav"] = "decoded_partial"
  (root / "header_only.wav").write_bytes(full[:44])
  cases["header_only.wav"] = "skipped"
  (root / "empty.wav").write_bytes(b"")
  cases["empty.wav"] = "skipped"
  (root / "text.wav").write_text("this is not audio\n" * 20)
  cases["text.wav"] = "skipped"
  cases["missing.wav"] = "skipped"
  return root, cases


def test_each_awkward_input_is_decoded_or_rejected_as_documented(bad_corpus):
  root, cases = bad_corpus
  for name, expect in cases.items():
    path = str(root / name)
    if expect == "skipped":
      with pytest.raises(audio.AudioDecodeError, match=name):
        audio.load_audio(path, SR, max_seconds=60)
      continue
    wave = audio.load_audio(path, SR, max_seconds=60)
    assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all(), name
    assert abs(float(wave.mean())) < 1e-4, name
    if expect == "decoded":
      assert len(wave) == pytest.approx(SR, abs=2), name
      if name != "silence.wav":
        assert 0.25 < np.abs(wave).max() < 0.35, name  # level kept, channels averaged
    elif expect == "decoded_capped":
      assert len(wave) == 60 * SR
    else:  # truncated: what the file holds
      assert 0 < len(wave) < SR


def test_pretraining_with_five_percent_bad_files_completes_and_counts(bad_corpus, tmp_path):
  root, _ = bad_corpus
  corpus = demo.write_demo_corpus(tmp_path / "demo", clips_per_class=8, eval_clips_per_class=1)
  manifest = json.loads(open(corpus["train"]).read())
  good = [dict(e, wav=os.path.join(tmp_path, "demo", e["wav"])) for e in manifest["data"]]
  bad = [{"wav": str(root / name), "labels": good[0]["labels"]}
         for name in ("empty.wav", "text.wav", "nan.wav", "missing.wav")]
  manifest["data"] = good[:40] + bad + good[40:]
  assert len(bad) / len(manifest["data"]) == pytest.approx(0.05, abs=0.01)
  path = tmp_path / "train_with_bad.json"
  path.write_text(json.dumps(manifest))
  result = _cli(tmp_path / "work", "--config.data.demo_dir=", f"--config.data.manifest={path}",
                f"--config.data.label_csv={corpus['label_csv']}", "--config.rounds=('encoder',)",
                "--config.encoder_phase.steps=10")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "work" / "summary.json").read_text())
  assert summary["phases"]["p1_encoder"]["skipped_clips"] >= len(bad)
  for entry in bad:
    assert os.path.basename(entry["wav"]) in result.stderr


def _cli(workdir, *overrides, wait=True):
  env = cpu_env.subprocess_env(1)
  args = [sys.executable, "-m", "bridle_jax.main", "--config=configs/audio.py:demo",
          f"--workdir={workdir}", "--config.checkpoint_every=4", "--config.log_every=4",
          *overrides]
  if not wait:
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return demo.write_demo_corpus(tmp_path_factory.mktemp("corpus"), clips_per_class=8,
                                eval_clips_per_class=1)


def _data_overrides(corpus):
  return ["--config.data.demo_dir=", f"--config.data.manifest={corpus['train']}",
          f"--config.data.label_csv={corpus['label_csv']}", "--config.rounds=('encoder',)",
          "--config.encoder_phase.steps=12"]


def _wait_for(pattern, process, timeout=300):
  deadline = time.time() + timeout
  while not glob.glob(str(pattern)):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, f"{pattern} never appeared"
    time.sleep(0.005)


def _assert_whole_phase_summarised(workdir):
  """Every step's loss once, in order, and the summary drawn from them."""
  with open(workdir / "history" / "p1_encoder.jsonl") as f:
    history = [json.loads(line) for line in f]
  assert [r["step"] for r in history] == list(range(1, 13))
  summary = json.loads((workdir / "summary.json").read_text())["phases"]["p1_encoder"]
  assert summary["steps"] == 12 and summary["from_step"] > 0
  assert summary["final_loss"] == pytest.approx(history[-1]["loss"])
  assert summary["mean_loss_last_10pct"] == pytest.approx(
      np.mean([r["loss"] for r in history[-2:]]))


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(corpus, tmp_path):
  process = _cli(tmp_path, *_data_overrides(corpus), wait=False)
  _wait_for(tmp_path / "checkpoints" / "p1_encoder" / "4", process)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 143
  assert "checkpoint saved, rerun the same command to resume" in stderr
  steps = [int(d) for d in os.listdir(tmp_path / "checkpoints" / "p1_encoder") if d.isdigit()]
  assert max(steps) >= 4
  result = _cli(tmp_path, *_data_overrides(corpus))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed at step {max(steps)}" in result.stderr
  _assert_whole_phase_summarised(tmp_path)


@pytest.mark.parametrize("save_dir", ["p1_encoder/8.orbax-checkpoint-tmp*",
                                      "p1_encoder_final/12.orbax-checkpoint-tmp*"])
def test_sigkill_during_a_save_leaves_the_workdir_resumable(corpus, tmp_path, save_dir):
  process = _cli(tmp_path, *_data_overrides(corpus), wait=False)
  _wait_for(tmp_path / "checkpoints" / save_dir, process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  result = _cli(tmp_path, *_data_overrides(corpus))
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_whole_phase_summarised(tmp_path)
  _, _, pretrained = workdir_lib.load_pretrained(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(pretrained))


def test_non_finite_batch_skips_the_update_and_is_counted(corpus, tmp_path):
  config = audio_config.get_config("demo")
  config.data.demo_dir, config.data.manifest = "", corpus["train"]
  config.data.label_csv = corpus["label_csv"]
  config.rounds = ("tokenizer",)
  prepare_lib.prepare(config, str(tmp_path))
  trainer = driver.Trainer(config, str(tmp_path))
  run = trainer.setup_phase(driver.phases(config)[0], None)
  batch = run.next_batch()
  before = jax.tree.map(np.asarray, jax.device_get((run.state.params, run.state.codebooks)))
  poisoned = dict(batch, waveform=np.full_like(batch["waveform"], np.nan))
  run.state, metrics, _ = run.train_step(run.state, trainer.device_batch(poisoned))
  assert not np.isfinite(float(metrics["loss"]))
  assert int(run.state.skipped_updates) == 1 and int(run.state.step) == 1
  after = jax.tree.map(np.asarray, jax.device_get((run.state.params, run.state.codebooks)))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)
  run.state, metrics, _ = run.train_step(run.state, trainer.device_batch(batch))
  assert np.isfinite(float(metrics["loss"])) and int(run.state.skipped_updates) == 1


def test_diverging_run_stops_past_the_threshold(corpus, tmp_path):
  result = _cli(tmp_path, *_data_overrides(corpus), "--config.encoder_phase.lr=1e30",
                "--config.max_nonfinite_updates=2")
  assert result.returncode == 2
  assert "max_nonfinite_updates=2" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("override,expected", [
    ("--config.data.foo=1", "error: unknown config field 'foo' in --config.data.foo=1"),
    ("--config.data.target_length=abc", "error: flag --config.data.target_length=abc"),
    ("--config.data.manifest=/no/such/train.json", "error: data.manifest: file not found"),
    ("--config.model.quantizer.type=lfq", "error: model.quantizer.type: 'lfq' is not one of"),
])
def test_config_errors_exit_with_one_line(tmp_path, override, expected):
  result = _cli(tmp_path, override, "--mode=data")
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = _cli(blocker / "work", "--mode=data")
  assert result.returncode == 2
  assert f"error: workdir {blocker / 'work'} is not writable" in result.stderr


def test_resuming_with_an_incompatible_config_is_refused(corpus, tmp_path):
  workdir_lib.save_config(audio_config.get_config("demo"), str(tmp_path))  # a run's record
  result = _cli(tmp_path, *_data_overrides(corpus), "--config.model.width=32")
  assert result.returncode == 2
  assert "model.width is 64 there and 32 now" in result.stderr.splitlines()[-1]
