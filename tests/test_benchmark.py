"""The benchmark command: compiled steps, FLOP counts, the report and BENCHMARKS.md rows."""
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from bridle_jax import benchmark
from bridle_jax.data import demo
from bridle_jax.models import window_attention_kernel
from configs import audio as audio_config

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_config():
  config = audio_config.get_config("demo")
  config.model.depth = config.model.decoder.depth = 1
  return config


@pytest.fixture(scope="module")
def encoder_phase():
  return benchmark.lower_phase(_demo_config(), "encoder", 16)


def test_encoder_cost_analysis_is_near_the_analytic_count(encoder_phase):
  models, state, _, _, lowered = encoder_phase
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  analytic = benchmark.analytic_flops(models, params, "encoder", 16)
  measured = benchmark.cost_flops(lowered[0])
  assert analytic > 0
  assert 0.3 < measured / analytic < 3.0


def test_flop_count_is_the_whole_step_however_it_is_sharded():
  # Counted before partitioning and backend rewrites (on a GPU, XLA's count of the
  # optimised program misses the cuBLAS matmuls), so replicated work is counted once.
  counts = []
  for mesh in (dict(data=8, fsdp=1, model=1), dict(data=2, fsdp=2, model=2)):
    config = _demo_config()
    config.mesh.update(mesh)
    counts.append(benchmark.cost_flops(benchmark.lower_phase(config, "encoder", 16)[-1][0]))
  assert counts[1] == pytest.approx(counts[0], rel=1e-6)


def test_encoder_step_has_no_host_callbacks(encoder_phase):
  hlo = encoder_phase[-1][0].compile().as_text().lower()
  for marker in ("outfeed", "host_callback", "xla_python_cpu_callback", "xla_ffi_python"):
    assert marker not in hlo


def test_tokenizer_phase_reports_throughput_and_flops():
  report = benchmark.run_step_benchmark(_demo_config(), "tokenizer", 16, num_steps=2, warmup=1,
                                        repeats=1)
  assert report["samples_per_second"] > 0 and report["step_ms"] > 0
  assert report["flops_per_step"] > 0 and report["analytic_flops_per_step"] > 0
  assert report["mfu"] is None  # CPU: no peak in the table
  assert np.isfinite(report["loss"])
  assert "samples/s" in benchmark.format_report(report)


def test_a_step_whose_loss_is_not_finite_gives_no_report():
  config = _demo_config()
  config.data.mean = float("nan")  # every input patch NaN
  with pytest.raises(FloatingPointError, match="encoder phase, batch 8: the last timed step's "
                                               "loss is nan; no row is written"):
    benchmark.run_step_benchmark(config, "encoder", 8, num_steps=1, warmup=1, repeats=1)


def test_the_command_refuses_an_invalid_config_naming_the_field(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "bridle_jax.benchmark", "--config=configs/audio.py",
       "--config.model.residual_stream_dtype=bf16", "--phase=encoder", "--batch=8"],
      cwd=REPO, env=cpu_env.subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "model.residual_stream_dtype: 'bf16' is not one of" in result.stderr


def test_sharded_encoder_step_runs_with_the_pallas_window_kernel():
  """The real encoder step split over 4 x 2 emulated devices, with a shifted and an
  unshifted Swin block whose window attention is the Pallas kernel (interpreted here)."""
  config = _demo_config()
  config.model.decoder.depth = 2
  config.model.decoder.attention_impl = "pallas"
  config.mesh.update(data=4, fsdp=1, model=2)
  report = benchmark.run_step_benchmark(config, "encoder", 8, num_steps=1, warmup=1, repeats=1)
  assert report["samples_per_second"] > 0 and report["flops_per_step"] > 0


def test_command_sweeps_batches_and_appends_a_row_each(tmp_path):
  table = tmp_path / "BENCHMARKS.md"
  table.write_text("# Benchmarks\n\nintro\n")
  env = cpu_env.subprocess_env(2)
  result = subprocess.run(
      [sys.executable, "-m", "bridle_jax.benchmark", "--config=configs/audio.py:demo",
       "--config.model.depth=1", "--phase=encoder", "--batch=8,16", "--steps=2", "--warmup=1",
       "--repeats=1", "--write", f"--benchmarks_file={table}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert float(re.search(r"^samples/s\s+([\d.]+)", result.stdout, re.M).group(1)) > 0
  assert float(re.search(r"^GFLOP/step \(XLA\)\s+([\d.]+)", result.stdout, re.M).group(1)) > 0
  text = table.read_text()
  assert text.startswith("# Benchmarks\n\nintro\n")
  assert re.search(r"^best batch: (8|16) \([\d.]+ samples/s\)$", result.stdout, re.M)
  rows = [line for line in text.splitlines() if line.startswith("| 2")]
  assert len(rows) == 2
  for row, batch in zip(rows, ("8", "16")):
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert len(cells) == len(benchmark.STEP_TABLE[1])
    assert cells[1] == "cpu x2" and cells[3:6] == ["encoder", batch, "float32"]
    assert cells[-1].startswith(f"`XLA_FLAGS='{cpu_env.xla_flags(2)}' "
                                "python -m bridle_jax.benchmark --config=configs/audio.py:demo")


def test_command_line_names_the_compiler_settings_it_ran_with():
  environ = {"XLA_FLAGS": "--xla_gpu_triton_gemm_any=true --xla_gpu_autotune_level=4",
             "LIBTPU_INIT_ARGS": "", "HOME": "/root"}
  assert benchmark.command_line(["--phase=encoder", "--config.data.manifest=a b.json"],
                                environ) == (
      "XLA_FLAGS='--xla_gpu_triton_gemm_any=true --xla_gpu_autotune_level=4' "
      "python -m bridle_jax.benchmark --phase=encoder '--config.data.manifest=a b.json'")
  assert benchmark.command_line(["--input"], {}) == "python -m bridle_jax.benchmark --input"


def test_rows_go_to_their_own_table(tmp_path):
  path = str(tmp_path / "B.md")
  step = {"device_kind": "NVIDIA H100 80GB HBM3", "device_count": 1, "phase": "joint",
          "batch": 64, "dtype": "bfloat16", "samples_per_second": 700.0, "step_ms": 91.4,
          "tflops_per_second": 400.0, "mfu": 0.404, "peak_memory_bytes": 3 * 2**30}
  host = {"phase": "input", "batch": 64, "clips_per_second": 3000.0, "clip_seconds": 10.0,
          "workers": 15, "clips_per_second_per_worker": 200.0, "cores": 16,
          "clips_per_second_per_core": 187.5}
  benchmark.append_row(path, *benchmark.table_row(step, "python -m x --a=1|2"))
  benchmark.append_row(path, *benchmark.table_row(host, "python -m x --input"))
  benchmark.append_row(path, *benchmark.table_row(step, "python -m x --b"))
  lines = open(path).read().splitlines()
  step_header = "| " + " | ".join(benchmark.STEP_TABLE[1]) + " |"
  input_header = "| " + " | ".join(benchmark.INPUT_TABLE[1]) + " |"
  assert lines.count(step_header) == 1 and lines.count(input_header) == 1
  start = lines.index(step_header)
  assert lines[start + 2].endswith("| 40.4% | 3.00 GiB | `python -m x --a=1\\|2` |")
  assert lines[start + 3].endswith("| `python -m x --b` |")  # the step table, not the end
  assert lines[start + 4] == "" and lines[start + 5] == "## Host input pipeline"
  assert lines[-1].endswith("| 16 | 15 | 64 | 10.00 | 3000.0 | 187.5 | 200.0 | "
                            "`python -m x --input` |")


class _Device:

  def __init__(self, platform, kind):
    self.platform, self.device_kind = platform, kind


@pytest.mark.parametrize("platform,kind,peak", [
    ("gpu", "NVIDIA H100 80GB HBM3", 989.0), ("gpu", "NVIDIA H200", 989.0),
    ("gpu", "NVIDIA A100-SXM4-80GB", 312.0), ("tpu", "TPU v4", 275.0),
    ("tpu", "TPU v5 lite", 197.0), ("tpu", "TPU v5p", 459.0), ("cpu", "cpu", None),
    ("gpu", "NVIDIA GeForce RTX 4090", None)])
def test_peak_tflops(platform, kind, peak):
  assert benchmark.peak_tflops(_Device(platform, kind)) == peak


@pytest.mark.parametrize("cost", [{"flops": 5.0}, [{"flops": 5.0}]])
def test_cost_flops_reads_dict_or_list(cost):
  lowered = type("Lowered", (), {"cost_analysis": lambda self: cost})()
  assert benchmark.cost_flops(lowered) == 5.0


def test_cost_flops_falls_back_to_the_cpu_cost_model(encoder_phase):
  # A backend whose analysis of the lowered program reports no FLOPs (the GPU one of jax
  # 0.11.2) gets the CPU count of the same HLO module.
  program = encoder_phase[-1][0]
  silent = type("Lowered", (), {"cost_analysis": lambda self: {},
                                "compiler_ir": lambda self, dialect: program.compiler_ir(dialect)})()
  counted = benchmark.cost_flops(program)
  assert counted > 0
  assert benchmark.cost_flops(silent) == pytest.approx(counted, rel=1e-6)


def test_sweep_skips_batches_that_run_out_of_memory_and_names_the_best():
  def run_one(batch):
    if batch == 512:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 80 GiB")
    return {"samples_per_second": {64: 900.0, 128: 1100.0, 256: 1050.0}[batch]}

  reports = benchmark.sweep_batches(run_one, [64, 128, 256, 512])
  assert reports[512] is None and reports[128]["samples_per_second"] == 1100.0
  assert benchmark.best_batch(reports) == 128
  assert benchmark.best_batch({512: None}) is None

  def broken(batch):
    raise jax.errors.JaxRuntimeError("INTERNAL: cuDNN failed")
  with pytest.raises(jax.errors.JaxRuntimeError, match="cuDNN"):
    benchmark.sweep_batches(broken, [64])


def test_input_benchmark_times_the_host_pipeline(tmp_path):
  corpus = demo.write_demo_corpus(tmp_path, clips_per_class=2, eval_clips_per_class=1)
  config = audio_config.get_config("demo")
  config.data.demo_dir = ""
  config.data.manifest, config.data.label_csv = corpus["train"], corpus["label_csv"]
  report = benchmark.run_input_benchmark(config, batch=4, num_batches=3, warmup=1)
  assert report["phase"] == "input" and report["clips_per_second"] > 0
  assert report["cores"] == len(os.sched_getaffinity(0))
  assert report["clips_per_second_per_core"] == pytest.approx(
      report["clips_per_second"] / report["cores"])
  assert "clips/s per core" in benchmark.format_report(report)
  assert report["clip_seconds"] == pytest.approx(1.28)  # 1.5 s demo clips, 128 frames kept


def test_flops_per_step_do_not_depend_on_gradient_accumulation():
  flops = {}
  for accum in (1, 4):
    config = _demo_config()
    config.encoder_phase.grad_accum = accum
    flops[accum] = benchmark.run_step_benchmark(config, "encoder", 16, num_steps=1, warmup=1,
                                                repeats=1)["flops_per_step"]
  assert flops[4] == pytest.approx(flops[1], rel=0.05)


def test_attention_benchmark_times_every_shape_of_the_recipe(monkeypatch):
  from bridle_jax import benchmark_attention
  config = _demo_config()
  rows = benchmark_attention.run(config, 2, [64], steps=1, warmup=1, repeats=1)
  # demo: 8x8 patches, mask 0.8 keeps 12 (+ CLS); XLA only on a CPU.
  assert [(r["shape"], r["variant"]) for r in rows] == [
      ("global 13 tokens (masked encoder)", "xla"), ("global 65 tokens (full-input ViTs)", "xla"),
      ("global 64 tokens (estimator)", "xla"), ("decoder windows (4, 4), shifted", "xla")]
  assert all(r["ms"] > 0 for r in rows)
  # On a GPU each padding multiple that gives a new length is one more cuDNN variant.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  labels = [(shape.split(" (")[0], variant)
            for shape, variant, _ in benchmark_attention.cases(config, 2, [1, 2, 64, 128])]
  assert labels == [
      ("global 13 tokens", "xla"), ("global 13 tokens", "cudnn pad 1 -> 13"),
      ("global 13 tokens", "cudnn pad 2 -> 14"), ("global 13 tokens", "cudnn pad 64 -> 64"),
      ("global 13 tokens", "cudnn pad 128 -> 128"),
      ("global 65 tokens", "xla"), ("global 65 tokens", "cudnn pad 1 -> 65"),
      ("global 65 tokens", "cudnn pad 2 -> 66"), ("global 65 tokens", "cudnn pad 64 -> 128"),
      ("global 64 tokens", "xla"), ("global 64 tokens", "cudnn pad 1 -> 64"),
      ("global 64 tokens", "cudnn pad 128 -> 128"),
      ("decoder windows", "xla"), ("decoder windows", "pallas")] + [
      ("decoder windows", f"pallas {g} windows, {w} warps")
      for g, w in benchmark_attention.KERNEL_TILINGS]
  # The Pallas cases build and run (the kernels interpreted on this CPU).
  monkeypatch.setattr(window_attention_kernel, "INTERPRET", True)
  for _, variant, build in benchmark_attention.cases(config, 2, [1]):
    if variant in ("pallas", "pallas 16 windows, 2 warps"):
      fn, args = build()
      assert all(np.isfinite(g).all() for g in jax.tree.leaves(fn(*args)))
