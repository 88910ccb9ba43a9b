"""The launch/ scripts parse, and the GPU benchmark script checks its imports first."""
import glob
import os
import subprocess
import sys
import time

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


def test_benchmark_gpu_stops_a_run_at_the_time_limit_and_skips_the_rest(tmp_path):
  """A run still going when TIME_LIMIT runs out is stopped and reported as failed; runs
  that would start with less than MIN_RUN_S left are skipped and named."""
  python = tmp_path / "python"
  python.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\nexec sleep 60\n')
  python.chmod(0o755)
  start = time.monotonic()
  result = _benchmark_gpu(str(python), "encoder", "tokenizer", "joint", TIME_LIMIT="3",
                          MIN_RUN_S="2")
  assert time.monotonic() - start < 30
  assert result.returncode == 1
  assert "failed: encoder" in result.stderr and "skipped: tokenizer joint" in result.stderr
  bad = _benchmark_gpu(str(python), "encoder", TIME_LIMIT="9 min")
  assert bad.returncode == 2 and "TIME_LIMIT must be a whole number of seconds" in bad.stderr


def _recording_python(tmp_path, record='$XLA_FLAGS | $*'):
  """An interpreter stub that appends `record` (shell-expanded at each call: by default
  "$XLA_FLAGS | <its arguments>") to the returned file."""
  calls = tmp_path / "calls"
  python = tmp_path / "python"
  python.write_text(f'#!/bin/sh\necho "{record}" >> {calls}\n')
  python.chmod(0o755)
  return python, calls


def _module_calls(calls, module):
  """The recorded arguments of each `python -m <module>` call."""
  return [line.split(f"-m {module} ", 1)[1] for line in calls.read_text().splitlines()
          if f"-m {module} " in line]


def test_benchmark_gpu_profiles_both_phases_at_the_last_batch_size(tmp_path):
  """`profile` traces each phase at the sweep's last batch size, into its own directory
  (the traced run itself: tests/test_profile_step.py)."""
  python, calls = _recording_python(tmp_path)
  result = _benchmark_gpu(str(python), "profile", CONFIG="configs/audio.py:demo",
                          SCRATCH=str(tmp_path), BATCHES="16,8")
  assert result.returncode == 0, result.stderr
  assert _module_calls(calls, "bridle_jax.profile_step") == [
      f"--config=configs/audio.py:demo --phase={phase} --batch=8 "
      f"--out_dir={tmp_path}/profile/{phase}" for phase in ("encoder", "tokenizer")]


@pytest.mark.parametrize("run, flags", [
    ("encoder_xla_window", "--config.model.decoder.attention_impl=xla"),
    ("encoder_reuse", "--config.encoder_phase.reuse_codes=True --config.data.roll_mag_aug=False"),
])
def test_benchmark_gpu_times_the_encoder_only_runs_at_the_batches_asked(tmp_path, run, flags):
  """The encoder-only runs sweep the encoder phase with their setting and write their rows
  to BENCHMARKS_FILE (the benchmark command itself: tests/test_benchmark.py)."""
  python, calls = _recording_python(tmp_path)
  rows = tmp_path / "BENCHMARKS.md"
  result = _benchmark_gpu(str(python), run, CONFIG="configs/audio.py:demo", BATCHES="8,16",
                          BENCHMARKS_FILE=str(rows))
  assert result.returncode == 0, result.stderr
  assert _module_calls(calls, "bridle_jax.benchmark") == [
      f"--config=configs/audio.py:demo --write --benchmarks_file={rows} --phase=encoder "
      f"--batch=8,16 {flags}"]


CUBLAS = "--xla_gpu_enable_triton_gemm=false"
MERGING = "--xla_gpu_dot_merger_threshold_mb=32"


@pytest.mark.parametrize("setting, flag, xla_flag", [
    ("bf16_residual", "--config.model.residual_stream_dtype=compute", None),
    ("remat_dots", "--config.model.remat=dots", None),
    ("cublas", "--batch=64,128", CUBLAS),
    ("gelu_tanh", "--config.model.gelu=tanh", CUBLAS),
    ("fast", "--config.model.gelu=tanh --config.model.residual_stream_dtype=compute", CUBLAS),
    ("merging", "--batch=64,128", MERGING),
])
def test_benchmark_gpu_times_each_phase_with_a_speed_setting(tmp_path, setting, flag, xla_flag):
  """The runs named <phase>_<setting> call the benchmark on their phase with the setting
  (an interpreter stub records the calls and their XLA_FLAGS)."""
  python, calls = _recording_python(tmp_path)
  result = _benchmark_gpu(str(python), f"encoder_{setting}", f"tokenizer_{setting}",
                          BATCHES="64,128")
  assert result.returncode == 0, result.stderr
  benchmarks = [line for line in calls.read_text().splitlines() if "bridle_jax.benchmark " in line]
  assert len(benchmarks) == 2
  for line, phase in zip(benchmarks, ("encoder", "tokenizer")):
    assert f"--phase={phase} --batch=64,128" in line
    assert line.endswith(flag)
    xla_flags = line.split(" | ")[0].split()
    for known in (CUBLAS, MERGING):
      assert (known in xla_flags) == (known == xla_flag), known


@pytest.mark.parametrize("own_cache", ["", "/elsewhere"], ids=["default", "own_directory"])
def test_benchmark_gpu_keeps_compiled_programs_for_later_runs(tmp_path, own_cache):
  """Every run sees the compilation cache under SCRATCH (where JAX also keeps XLA's
  autotuning results), or the caller's own directory; the caller's XLA flags pass as
  given."""
  python, calls = _recording_python(tmp_path, "$JAX_COMPILATION_CACHE_DIR | $XLA_FLAGS")
  result = _benchmark_gpu(str(python), "encoder", "tokenizer", SCRATCH=str(tmp_path),
                          JAX_COMPILATION_CACHE_DIR=own_cache,
                          XLA_FLAGS="--xla_gpu_triton_gemm_any=true")
  assert result.returncode == 0, result.stderr
  cache = own_cache or f"{tmp_path}/jax_cache"
  assert set(calls.read_text().splitlines()) == {f"{cache} | --xla_gpu_triton_gemm_any=true"}
