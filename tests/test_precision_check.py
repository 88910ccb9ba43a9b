"""bfloat16 against float32 on a short demo run: losses within noise, codes agree."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bridle_jax import precision_check
from bridle_jax.data import demo
from configs import audio as audio_config

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_curves_measures_the_gap_against_another_seed():
  rng = np.random.default_rng(0)
  reference = 2.0 + 0.1 * rng.standard_normal(40)
  other_seed = reference + 0.05
  close = precision_check.compare_curves(reference, reference + 0.04, other_seed)
  assert close["within_noise"]
  assert close["gap"] == pytest.approx(0.04, abs=1e-6)
  assert close["seed_gap"] == pytest.approx(0.05, abs=1e-6)
  far = precision_check.compare_curves(reference, reference - 0.3, other_seed)
  assert not far["within_noise"]


def test_bf16_side_of_the_gradient_check_keeps_the_checked_speed_settings():
  """load_pretrained resets the float32 run's speed settings; the bf16 models of the code
  and gradient comparison take the checked config's again."""
  config = audio_config.get_config("demo")
  config.model.residual_stream_dtype = "compute"
  config.model.decoder.attention_impl = "pallas"
  low = precision_check.bf16_config(config)
  assert low.model.dtype == "bfloat16"
  speed = (low.model.residual_stream_dtype, low.model.decoder.attention_impl)
  assert speed == ("compute", "pallas")
  assert (config.model.dtype, config.model.residual_stream_dtype) == ("float32", "compute")


def test_float32_runs_compute_as_the_reference_and_bfloat16_with_the_settings(tmp_path,
                                                                               monkeypatch):
  trained = {}

  class RecordingTrainer:
    def __init__(self, config, workdir):
      trained[os.path.basename(workdir)] = config
      self.loss_histories = {}

    def run(self):
      pass

  monkeypatch.setattr(precision_check.driver, "Trainer", RecordingTrainer)
  config = audio_config.get_config("demo")
  config.model.gelu = "tanh"
  config.model.residual_stream_dtype = "compute"
  precision_check.train_runs(config, str(tmp_path))
  settings = {name: (c.model.dtype, c.model.gelu, c.model.residual_stream_dtype, c.seed)
              for name, c in trained.items()}
  assert settings == {"float32": ("float32", "exact", "float32", config.seed),
                      "bfloat16": ("bfloat16", "tanh", "compute", config.seed),
                      "float32_next_seed": ("float32", "exact", "float32", config.seed + 1)}


def _precision_check(*args):
  """The command as users run it, on one CPU device."""
  return subprocess.run(
      [sys.executable, "-m", "bridle_jax.precision_check", "--config=configs/audio.py:demo",
       *args], cwd=REPO, env=cpu_env.subprocess_env(1), capture_output=True, text=True,
      timeout=900)


def test_bf16_demo_run_matches_float32(tmp_path):
  corpus = demo.write_demo_corpus(tmp_path / "corpus", clips_per_class=4, eval_clips_per_class=1)
  args = (f"--workdir={tmp_path / 'runs'}", "--code_batch=32", "--config.data.demo_dir=",
          f"--config.data.manifest={corpus['train']}",
          f"--config.data.label_csv={corpus['label_csv']}",
          # bf16 tokenizer and encoder, float32 quantizer and EMA
          "--config.rounds=('tokenizer',)", "--config.tokenizer_phase.steps=16")
  result = _precision_check(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert set(report["phases"]) == {"p1_tokenizer"}
  for phase, curves in report["phases"].items():
    assert curves["within_noise"], (phase, curves)
  assert min(report["code_agreement"]) > 0.9, report["code_agreement"]
  # One step's bf16 gradients point the float32 way: a few percent off, not noise.
  assert set(report["gradient_error"]) == {"encoder", "tokenizer"}
  assert all(0 < e < 0.2 for e in report["gradient_error"].values()), report["gradient_error"]
  assert sorted(os.listdir(tmp_path / "runs")) == sorted(precision_check.RUNS)
  again = _precision_check(*args)
  assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr[-3000:]
