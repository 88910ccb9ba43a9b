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


@pytest.mark.parametrize("exit_code,requeued", [(143, True), (1, False)])
def test_slurm_script_gives_each_task_its_cores_and_requeues_when_preempted(
    tmp_path, exit_code, requeued):
  log = tmp_path / "calls"
  for name, code in (("srun", exit_code), ("scontrol", 0)):
    stub = tmp_path / name
    stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit {code}\n')
    stub.chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", WORKDIR="/shared/run 1",
             SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="6")
  result = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "--config=configs/audio.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == exit_code
  calls = log.read_text().splitlines()
  assert calls[0] == ("srun --cpus-per-task=6 --cpu-bind=cores python -m bridle_jax.main "
                      "--distributed --workdir=/shared/run 1 --config=configs/audio.py")
  assert calls[1:] == (["scontrol requeue 42"] if requeued else [])


GCLOUD_STUB = """#!/bin/bash
# gcloud compute tpus tpu-vm ssh|scp ...: one host, whose home is $FAKE_HOME.
echo "gcloud $4" >> "$LOG"
if [[ $4 == ssh ]]; then
  while [[ $# -gt 0 ]]; do [[ $1 == --command ]] && cmd=$2; shift; done
  cd "$FAKE_HOME" && HOME="$FAKE_HOME" bash -c "$cmd"
else
  dest="${@: -1}"
  cp "${@: -2:1}" "$FAKE_HOME/${dest#*:\\~/}"
fi
"""


def _tpu_pod(tmp_path, repo, *args, **env):
  (tmp_path / "home").mkdir(exist_ok=True)
  for name, text in (("gcloud", GCLOUD_STUB),
                     ("python3", '#!/bin/sh\necho "python3 $PWD $*" >> "$LOG"\n')):
    (tmp_path / name).write_text(text)
    (tmp_path / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", TPU_NAME="pod",
             ZONE="us-central2-b", FAKE_HOME=str(tmp_path / "home"),
             LOG=str(tmp_path / "log"), **env)
  result = subprocess.run(["bash", os.path.join(repo, "launch", "tpu_pod.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return (tmp_path / "log").read_text().splitlines()


def test_tpu_pod_setup_copies_the_checkout_without_environments_or_history(tmp_path):
  repo = tmp_path / "checkout"
  for path in ("launch/tpu_pod.sh", "configs/audio.py", ".venv/lib/big", ".git/HEAD",
               "bridle_jax/__pycache__/x.pyc"):
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text("x")
  (repo / "launch/tpu_pod.sh").write_text(open(os.path.join(REPO, "launch/tpu_pod.sh")).read())
  (tmp_path / "home" / "bridle_jax").mkdir(parents=True)
  (tmp_path / "home" / "bridle_jax" / "stale.py").write_text("from an earlier setup")
  calls = _tpu_pod(tmp_path, str(repo), "--setup")
  remote = tmp_path / "home" / "bridle_jax"
  assert calls == ["gcloud ssh", "gcloud scp", "gcloud ssh",
                   f"python3 {remote} -m pip install -q -e . jax[tpu]"]
  copied = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
  assert copied == ["configs/audio.py", "launch/tpu_pod.sh"]


def test_tpu_pod_runs_the_command_with_its_arguments_intact(tmp_path):
  (tmp_path / "home" / "bridle_jax").mkdir(parents=True)
  calls = _tpu_pod(tmp_path, REPO, "--config=configs/audio.py",
                   "--config.rounds=('encoder', 'tokenizer')", WORKDIR="/mnt/shared/run 1")
  assert calls[-1].endswith(" -m bridle_jax.main --distributed --workdir=/mnt/shared/run 1 "
                            "--config=configs/audio.py --config.rounds=('encoder', 'tokenizer')")


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


CUBLAS = "--config.model.gpu_matmuls=cublas"
MERGING = "--xla_gpu_dot_merger_threshold_mb=32"


@pytest.mark.parametrize("setting, flag, xla_flag", [
    ("bf16_residual", "--config.model.residual_stream_dtype=compute", None),
    ("remat_dots", "--config.model.remat=dots", None),
    ("cublas", CUBLAS, None),
    ("gelu_tanh", f"{CUBLAS} --config.model.gelu=tanh", None),
    ("fast", f"{CUBLAS} --config.model.gelu=tanh --config.model.residual_stream_dtype=compute",
     None),
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
    assert (MERGING in xla_flags) == (MERGING == xla_flag)


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
