"""Step and input-pipeline throughput of a phase, optionally logged to BENCHMARKS.md.

  python -m bridle_jax.benchmark --config=configs/audio.py --phase=encoder --batch=64,128,256 \
      [--steps=20] [--warmup=3] [--repeats=3] [--dtype=bfloat16] [--write]
  python -m bridle_jax.benchmark --config=configs/audio.py:demo --phase=encoder --batch=16
  python -m bridle_jax.benchmark --config=configs/audio.py:demo --input --workdir=/tmp/bench
  python -m bridle_jax.benchmark --config=configs/audio.py --input \
      --config.data.manifest=train.json --config.data.label_csv=labels.csv

The step benchmark compiles the phase's real jitted step (parameter shardings from the
config's mesh and rules, donated state) and feeds it one random input batch, so no
data is read. Step time is the median over `--repeats` timed loops of `--steps` steps,
each loop ended by one block_until_ready. FLOPs come from XLA's cost analysis of the
step as lowered, before backend optimisation; MFU is against the device's dense bf16
peak. `--input` instead times the grain pipeline of `config.data` on the host (the demo
corpus is written to `--workdir`).
Several `--batch` sizes are measured one after the other; one that runs out of device
memory is reported as such, and the fastest is named at the end.
"""
import copy
import datetime
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import numpy as np
from absl import app
from absl import flags
from jax._src import xla_bridge  # the CPU backend's cost model (cost_flops)
from jax._src.lib import _jax as jax_lib
from ml_collections import config_flags

from bridle_jax import config_validation
from bridle_jax import files
from bridle_jax import prepare
from bridle_jax.data import audio
from bridle_jax.data import inputs
from bridle_jax.data import pipeline
from bridle_jax.data import sources
from bridle_jax.models import platform
from bridle_jax.train import device_memory
from bridle_jax.train import optim
from bridle_jax.train import sharding
from bridle_jax.train import state as state_lib
from bridle_jax.train import steps


def _define_flags():
  """Command-line flags; defined only when run as a command (main.py owns --config too)."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py:demo.")
  flags.DEFINE_enum("phase", "encoder", ["encoder", "tokenizer", "joint"], "Phase to time.")
  flags.DEFINE_list("batch", ["64"], "Global batch size, or several to sweep (64,128,256); "
                    "a size that runs out of device memory is reported and skipped.")
  flags.DEFINE_integer("steps", 20, "Steps (or input batches) per timed loop.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps (or batches) before timing.")
  flags.DEFINE_integer("repeats", 3, "Timed loops; the step time is their median.")
  flags.DEFINE_string("dtype", None, "Compute dtype (default: config.model.dtype).")
  flags.DEFINE_bool("input", False, "Time the host input pipeline instead of the step.")
  flags.DEFINE_string("workdir", None, "Expands {workdir} in data paths (--input).")
  flags.DEFINE_bool("write", False, "Append a row to --benchmarks_file.")
  flags.DEFINE_string("benchmarks_file", "BENCHMARKS.md", "Table to append to.")


# Dense bf16 peak TFLOP/s per device, matched in order against `device_kind`.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
               ("v5 lite", 197.0), ("v5e", 197.0), ("v5p", 459.0), ("v4", 275.0))

# The two tables of BENCHMARKS.md: (title, columns).
STEP_TABLE = ("Results", ("date", "devices", "jax / flax", "phase", "batch", "dtype",
                          "samples/s", "step ms", "TFLOP/s", "MFU", "peak memory", "command"))
INPUT_TABLE = ("Host input pipeline", ("date", "host cores", "workers", "batch", "audio s",
                                       "clips/s", "clips/s per core", "clips/s per worker",
                                       "command"))


def peak_tflops(device) -> float | None:
  """The device's dense bf16 peak, or None for CPUs and unknown kinds."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind), None)


def _flops_of(cost) -> float:
  """The "flops" entry of a cost analysis (a list of dicts in older jax)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def cost_flops(lowered) -> float:
  """FLOPs of one call of a lowered program, by XLA's cost analysis.

  Counted on the program before the backend optimises it: on a GPU the optimised program
  hands its matmuls to cuBLAS custom calls, which the cost analysis counts as nothing.
  Where the device backend reports no FLOPs for it (the GPU backend of jax 0.11.2 does
  not, and jax 0.11.2 refuses to ask a TPU topology compiled for without a TPU), the CPU
  backend's cost model counts the same HLO module. Custom calls (cuDNN attention) count
  as nothing in either.
  """
  try:
    flops = _flops_of(lowered.cost_analysis())
  except jax.errors.JaxRuntimeError:
    flops = 0.0
  if flops > 0:
    return flops
  module = lowered.compiler_ir("hlo").as_hlo_module()
  return _flops_of(jax_lib.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))


def peak_memory_bytes() -> int | None:
  """The largest peak_bytes_in_use over local devices, None where unreported (CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def _kernel_size(tree, skip: str = "") -> int:
  """Weights of the dense/conv kernels in a param tree (the per-token matmul weights)."""
  return sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
             if "kernel" in (name := jax.tree_util.keystr(path)) and not (skip and skip in name))


def encoder_tokens(models: state_lib.Models) -> int:
  """Tokens the masked encoder runs on: CLS and the visible patches."""
  x = jax.ShapeDtypeStruct((1, *models.input_shape), np.float32)
  rngs = {"params": jax.random.PRNGKey(0), "mask": jax.random.PRNGKey(1)}
  features = jax.eval_shape(
      lambda x: models.encoder.init_with_output(rngs, x, apply_mask=True)[0][0], x)
  return features.shape[1]


def median_seconds(run, num_steps: int, warmup: int, repeats: int) -> float:
  """Median seconds per step of `run(n)`, which runs n steps and waits for the last."""
  run(warmup)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run(num_steps)
    times.append((time.perf_counter() - start) / num_steps)
  return statistics.median(times)


def analytic_flops(models: state_lib.Models, params: dict, kind: str, batch: int,
                   tokenizer_every: int = 1, reuse_codes: bool = False) -> float:
  """2 x kernel weights x tokens per forward, x3 for trained modules (forward + backward).

  With `reuse_codes` the encoder step reads stored codes and skips the tokenizer.
  """
  patches = models.encoder.num_patches
  visible = encoder_tokens(models)
  enc = 2 * _kernel_size(params["encoder"])
  masked_encoder = enc * visible
  teacher = enc * (patches + 1)
  decoder = 2 * _kernel_size(params["decoder"]) * patches
  tokenizer = 2 * _kernel_size(params["tokenizer"], skip="cold_start_encoder") * (patches + 1)
  estimator = 2 * _kernel_size(params["estimator"]) * patches
  encoder_step = 3 * (masked_encoder + decoder) + (0 if reuse_codes else tokenizer)
  tokenizer_step = teacher + 3 * (tokenizer + estimator)
  per_sample = {"encoder": encoder_step, "tokenizer": tokenizer_step}.get(kind)
  if kind == "joint":
    full = 3 * (masked_encoder + decoder + tokenizer + estimator) + teacher
    per_sample = (full + (tokenizer_every - 1) * encoder_step) / tokenizer_every
  return float(per_sample * batch)


def random_batch(config, specs: dict, codebook_size: int, batch_sharding) -> dict:
  """Random inputs of the global shapes in `specs` (this host's rows of each), sharded
  like the training input (`inputs.random_batch`, and stored codes)."""
  local = pipeline.host_batch_size(next(iter(specs.values())).shape[0], jax.process_count())
  rng = np.random.default_rng(config.seed + jax.process_index())
  host = inputs.random_batch(config.data, local, rng)
  if "codes" in specs:
    host["codes"] = rng.integers(codebook_size, size=(local, *specs["codes"].shape[1:]),
                                 dtype=np.int32)
  return pipeline.to_device_batch(host, batch_sharding)


def reuses_codes(config, kind: str) -> bool:
  return kind == "encoder" and config.encoder_phase.get("reuse_codes", False)


class PhasePrograms(NamedTuple):
  """A phase's jitted steps with the shapes and shardings of what they take."""
  models: state_lib.Models
  fresh: Callable  # rng -> the phase's initial state (boxed, with logical axis names)
  state_shardings: Any
  batch: dict  # input name -> jax.ShapeDtypeStruct of the global batch, with its sharding
  schedule: optim.WarmupCosine  # the lr schedule's scalars as jax.ShapeDtypeStructs
  steps: list  # the jitted step; a joint phase's second is the one without tokenizer term


def phase_programs(config, kind: str, batch: int, mesh) -> PhasePrograms:
  """The phase's steps as the driver builds them (parameter shardings from the config's
  rules, donated state) for a global `batch` on `mesh`, not yet lowered."""
  phase_config = config[f"{kind}_phase"]
  sharding.check_batch_divides("--batch", batch, mesh)
  models = state_lib.build_models(config)
  tx = optim.adamw_direction(phase_config)
  fresh = state_lib.fresh_state_fn(models, steps.PHASE_GROUPS[kind], tx)
  shardings = sharding.shardings_for(jax.eval_shape(fresh, jax.random.PRNGKey(0)), mesh,
                                     config.sharding_rules)
  batch_sharding = sharding.batch_sharding(mesh)
  shapes = inputs.batch_shapes(config.data, batch)
  if reuses_codes(config, kind):  # the steady state: codes stored in the first epoch
    spec = models.quantizer
    shapes["codes"] = ((batch, models.encoder.num_patches,
                        spec.num_codebooks * spec.soft_code), np.int32)
  batch_specs = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                 for name, (shape, dtype) in shapes.items()}
  replicated = sharding.replicated(mesh)
  schedule = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          benchmark_schedule(phase_config))

  def jitted(**kwargs):
    fn = steps.phase_step(models, kind, phase_config, tx, **kwargs)
    return jax.jit(fn, in_shardings=(shardings, {name: batch_sharding for name in batch_specs},
                                     replicated),
                   out_shardings=(shardings, replicated, replicated), donate_argnums=0,
                   compiler_options=platform.model_compiler_options(config.model))

  programs = [jitted()] + ([jitted(with_tokenizer=False)] if kind == "joint" else [])
  return PhasePrograms(models, fresh, shardings, batch_specs, schedule, programs)


def benchmark_schedule(phase_config) -> optim.WarmupCosine:
  """A long schedule past its warmup, so timed steps update with a nonzero lr."""
  return optim.warmup_cosine(phase_config.lr, phase_config.min_lr, 1, 1_000_000)


def abstract_state(phase: PhasePrograms):
  """The shapes, dtypes and shardings of the phase's state, without allocating it."""
  abstract = nn.unbox(jax.eval_shape(phase.fresh, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, phase.state_shardings)


def lower_phase(config, kind: str, batch: int):
  """(models, state, device batch, schedule, lowered steps) of a phase on this process's
  devices: fresh state, random input. The encoder phase is the steady-state one (trained
  tokenizer, not the cold start); a joint phase has two steps, with and without the
  tokenizer term.
  """
  mesh = sharding.make_mesh(config.mesh)
  phase = phase_programs(config, kind, batch, mesh)
  state = jax.jit(lambda r: nn.unbox(phase.fresh(r)), out_shardings=phase.state_shardings)(
      jax.random.PRNGKey(config.seed))
  device_batch = random_batch(config, phase.batch, phase.models.quantizer.codebook_size,
                              sharding.batch_sharding(mesh))
  schedule = jax.device_put(benchmark_schedule(config[f"{kind}_phase"]),
                            sharding.replicated(mesh))
  return (phase.models, state, device_batch, schedule,
          [p.lower(state, device_batch, schedule) for p in phase.steps])


def step_cycle(config, kind: str, programs: list) -> list:
  """The programs of one cycle of steps: a joint phase runs `programs[0]` (with the
  tokenizer term) every `tokenizer_every`-th step and `programs[-1]` otherwise."""
  every = config[f"{kind}_phase"].get("tokenizer_every", 1) if kind == "joint" else 1
  return [programs[0] if i % every == 0 else programs[-1] for i in range(every)]


def run_step_benchmark(config, kind: str, batch: int, num_steps: int, warmup: int,
                       repeats: int) -> dict:
  """Times the phase's compiled step on random input; returns the report."""
  models, state, device_batch, lr_schedule, lowered = lower_phase(config, kind, batch)
  cycle = step_cycle(config, kind, [program.compile() for program in lowered])
  counted = step_cycle(config, kind, lowered)
  every = len(cycle)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  step = 0
  metrics = None

  def run(n):
    nonlocal state, step, metrics
    for _ in range(n):
      state, metrics, _ = cycle[step % every](state, device_batch, lr_schedule)
      step += 1
    jax.block_until_ready(state)

  step_time = median_seconds(run, num_steps, warmup, repeats)
  peak_memory = peak_memory_bytes()  # before the FLOP count below can allocate more
  loss = float(metrics["loss"])
  if not np.isfinite(loss):  # a fast step that computes nonsense is no result
    raise FloatingPointError(f"{kind} phase, batch {batch}: the last timed step's loss is "
                             f"{loss}; no row is written")
  state = device_batch = None  # frees the device for the state built below
  # The lowered program is the whole (unpartitioned) step, so this is the global count.
  # Cost analysis counts the body of a grad_accum loop once, so the FLOPs come from the
  # same step lowered without accumulation (the same work per step; never run).
  if config[f"{kind}_phase"].grad_accum > 1:
    config = copy.deepcopy(config)
    config[f"{kind}_phase"].grad_accum = 1
    counted = step_cycle(config, kind, lower_phase(config, kind, batch)[-1])
  flops = sum(cost_flops(program) for program in counted) / every
  device = jax.devices()[0]
  peak = peak_tflops(device)
  tflops = flops / step_time / 1e12
  analytic = analytic_flops(models, params, kind, batch, every, reuses_codes(config, kind))
  return {
      "phase": kind + (" (reused codes)" if reuses_codes(config, kind) else ""),
      "batch": batch, "dtype": config.model.dtype,
      "device_kind": device.device_kind, "device_count": jax.device_count(),
      "samples_per_second": batch / step_time, "step_ms": 1e3 * step_time,
      "flops_per_step": flops, "analytic_flops_per_step": analytic,
      "cost_to_analytic": flops / analytic if analytic else None,
      "tflops_per_second": tflops,
      "mfu": tflops / (peak * jax.device_count()) if peak else None,
      "peak_memory_bytes": peak_memory, "loss": loss,
  }


def sweep_batches(run_one, batches) -> dict:
  """{batch: run_one(batch)}, None where the device ran out of memory."""
  reports = {}
  for batch in batches:
    try:
      reports[batch] = run_one(batch)
    except jax.errors.JaxRuntimeError as e:
      if not device_memory.is_out_of_memory(e):
        raise
      reports[batch] = None
  return reports


def best_batch(reports: dict) -> int | None:
  """The batch with the most samples/s among those that ran."""
  ran = {b: r["samples_per_second"] for b, r in reports.items() if r is not None}
  return max(ran, key=ran.get) if ran else None


def run_input_benchmark(config, batch: int, num_batches: int, warmup: int) -> dict:
  """Times the grain pipeline of `config.data` (prepared) on this host; returns the report."""
  source = sources.open_source(config.data)
  iterator = iter(pipeline.build_dataset(source, config.data, global_batch_size=batch,
                                         seed=config.seed))
  for _ in range(max(warmup, 1)):  # worker start-up stays out of the timing
    next(iterator)
  start = time.perf_counter()
  batches = [next(iterator) for _ in range(num_batches)]
  rate = sum(len(b["label"]) for b in batches) / (time.perf_counter() - start)
  workers = pipeline.worker_count(config.data.num_workers)
  cores = pipeline.host_cores()
  report = {"phase": "input", "batch": batch, "clips_per_second": rate,
            "samples_per_second": rate, "workers": workers,
            "clips_per_second_per_worker": rate / max(workers, 1), "cores": cores,
            "clips_per_second_per_core": rate / cores, "clip_seconds": None}
  if inputs.modality(config.data) == "audio":
    seconds_per_frame = audio.frame_shift(config.data.sample_rate) / config.data.sample_rate
    frames = np.concatenate([b["valid_frames"] for b in batches])
    report["clip_seconds"] = float(frames.mean()) * seconds_per_frame
  return report


def _fmt(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def _memory(num_bytes) -> str:
  return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def table_row(report: dict, command: str) -> tuple[tuple, str]:
  """The table a report belongs to, and its row there."""
  date = datetime.date.today().isoformat()
  if report["phase"] == "input":
    table = INPUT_TABLE
    cells = (date, str(report["cores"]), str(report["workers"]), str(report["batch"]),
             _fmt(report["clip_seconds"], ".2f"), _fmt(report["clips_per_second"], ".1f"),
             _fmt(report["clips_per_second_per_core"], ".1f"),
             _fmt(report["clips_per_second_per_worker"], ".1f"), f"`{command}`")
  else:
    table = STEP_TABLE
    cells = (date, f"{report['device_kind']} x{report['device_count']}",
             f"{jax.__version__} / {flax.__version__}", report["phase"], str(report["batch"]),
             report["dtype"], _fmt(report["samples_per_second"], ".1f"),
             _fmt(report.get("step_ms"), ".1f"), _fmt(report.get("tflops_per_second"), ".3f"),
             _fmt(report.get("mfu"), ".1%"), _memory(report.get("peak_memory_bytes")),
             f"`{command}`")
  return table, "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def append_row(path: str, table: tuple, row: str) -> None:
  """Adds `row` at the end of `table` in `path`, starting that table at the end of the
  file if it has none."""
  title, columns = table
  header = "| " + " | ".join(columns) + " |"
  lines = open(path).read().splitlines() if os.path.exists(path) else []
  if header in lines:
    end = lines.index(header) + 1
    while end < len(lines) and lines[end].startswith("|"):
      end += 1
    lines.insert(end, row)
  else:
    if lines and lines[-1]:
      lines.append("")
    lines += [f"## {title}", "", header, "|" + "---|" * len(columns), row]
  files.write_atomic(path, ("\n".join(lines) + "\n").encode())


def format_report(report: dict) -> str:
  if report["phase"] == "input":
    lines = [("clips/s", _fmt(report["clips_per_second"], ".1f")),
             ("audio s per clip", _fmt(report["clip_seconds"], ".2f")),
             ("workers", str(report["workers"] or "0 (in-process)")),
             ("clips/s per worker", _fmt(report["clips_per_second_per_worker"], ".1f")),
             ("cores", str(report["cores"])),
             ("clips/s per core", _fmt(report["clips_per_second_per_core"], ".1f"))]
  else:
    lines = [("device", f"{report['device_kind']} x{report['device_count']}"),
             ("phase", report["phase"]), ("batch", str(report["batch"])),
             ("dtype", report["dtype"]),
             ("samples/s", _fmt(report["samples_per_second"], ".1f")),
             ("step ms (median)", _fmt(report["step_ms"], ".2f")),
             ("GFLOP/step (XLA)", _fmt(report["flops_per_step"] / 1e9, ".3f")),
             ("GFLOP/step (analytic)", _fmt(report["analytic_flops_per_step"] / 1e9, ".3f")),
             ("XLA / analytic", _fmt(report["cost_to_analytic"], ".2f")),
             ("TFLOP/s", _fmt(report["tflops_per_second"], ".3f")),
             ("MFU", _fmt(report["mfu"], ".1%")),
             ("peak memory", _memory(report["peak_memory_bytes"])),
             ("loss (last step)", f"{report['loss']:.4f}")]
  return "\n".join(f"{name:<22} {value}" for name, value in lines)


# Environment variables that change the compiled program; a row names those that were set.
COMPILER_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


def command_line(args, environ) -> str:
  """The command a row records: the compiler settings from the environment, then the flags."""
  env = [f"{name}={shlex.quote(environ[name])}" for name in COMPILER_ENV if environ.get(name)]
  return " ".join(env + [shlex.join(["python", "-m", "bridle_jax.benchmark", *args])])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/audio.py:demo")
  if flags.FLAGS.dtype:
    config.model.dtype = flags.FLAGS.dtype
  try:  # ascending, so each row's peak memory (the process's peak so far) is its own
    batches = sorted(int(b) for b in flags.FLAGS.batch)
  except ValueError as e:
    raise app.UsageError(f"--batch takes integers: {e}") from e
  if flags.FLAGS.input:
    if not flags.FLAGS.workdir and "{workdir}" in config.data.manifest:
      raise app.UsageError("--input with this config needs --workdir")
    prepare.prepare(config, flags.FLAGS.workdir or "")
    reports = {b: run_input_benchmark(config, b, flags.FLAGS.steps, flags.FLAGS.warmup)
               for b in batches}
  else:
    try:
      config_validation.validate_config(config, data_paths=False)
    except config_validation.ConfigError as e:
      raise app.UsageError(str(e)) from e
    reports = sweep_batches(
        lambda b: run_step_benchmark(config, flags.FLAGS.phase, b, flags.FLAGS.steps,
                                     flags.FLAGS.warmup, flags.FLAGS.repeats), batches)
  command = command_line(sys.argv[1:], os.environ)
  for batch, report in reports.items():
    if report is None:
      print(f"batch {batch}: out of device memory\n")
      continue
    print(format_report(report) + "\n")
    if flags.FLAGS.write and jax.process_index() == 0:
      append_row(flags.FLAGS.benchmarks_file, *table_row(report, command))
      print(f"row appended to {flags.FLAGS.benchmarks_file}\n")
  best = best_batch(reports)
  if len(reports) > 1 and best is not None:
    print(f"best batch: {best} ({reports[best]['samples_per_second']:.1f} samples/s)")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
