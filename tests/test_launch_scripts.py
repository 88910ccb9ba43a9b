"""The launch/ scripts parse, and the GPU benchmark script checks its imports first."""
import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses(script):
  result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def _benchmark_gpu(python, *runs, **env):
  env = dict(os.environ, PYTHON=python, JAX_PLATFORMS="cpu", **env)
  return subprocess.run(["bash", "launch/benchmark_gpu.sh", *runs], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_benchmark_gpu_reports_an_unknown_run_after_its_import_check():
  result = _benchmark_gpu(sys.executable, "encoderr")
  assert result.returncode == 1
  assert "unknown run 'encoderr'" in result.stderr and "failed: encoderr" in result.stderr


def test_benchmark_gpu_stops_at_once_when_the_package_does_not_import(tmp_path):
  python = tmp_path / "python"
  python.write_text("#!/bin/sh\nexec %s -c 'import no_such_module_here'\n" % sys.executable)
  python.chmod(0o755)
  result = _benchmark_gpu(str(python), "encoder")
  assert result.returncode == 2
  assert "No module named 'no_such_module_here'" in result.stderr
  assert "bridle_jax does not import" in result.stderr and "=== encoder" not in result.stdout


def test_benchmark_gpu_profiles_both_phases(tmp_path):
  result = _benchmark_gpu(sys.executable, "profile", CONFIG="configs/audio.py:demo",
                          SCRATCH=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  for phase in ("encoder", "tokenizer"):
    summary = json.loads((tmp_path / "profile" / phase / "profile_summary.json").read_text())
    assert (summary["phase"], summary["batch"]) == (phase, 128)
  assert result.stdout.count("wall time per step") == 2


def test_benchmark_gpu_times_speed_variants_at_the_batches_asked(tmp_path):
  """The sharded encoder step with XLA's window attention and the tokenizer step with a
  bf16 residual stream (batch split over the 8 emulated devices) run and write their rows."""
  rows = tmp_path / "BENCHMARKS.md"
  result = _benchmark_gpu(sys.executable, "encoder_xla_window", "tokenizer_bf16_residual",
                          CONFIG="configs/audio.py:demo", BATCHES="8",
                          BENCHMARKS_FILE=str(rows), SCRATCH=str(tmp_path))
  assert result.returncode == 0, result.stderr[-2000:]
  lines = rows.read_text().splitlines()
  written = [line for line in lines if "attention_impl=xla" in line]
  assert len(written) == 1 and "| encoder | 8 |" in written[0]
  written = [line for line in lines if "residual_stream_dtype=compute" in line]
  assert len(written) == 1 and "| tokenizer | 8 |" in written[0]
