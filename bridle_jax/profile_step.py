"""Where a phase's step time goes on the device: a trace and a summary of it.

  python -m bridle_jax.profile_step --config=configs/audio.py --phase=encoder --batch=128 \
      --out_dir=/tmp/profile [--steps=3] [--warmup=2] [--top=25]

Builds and compiles the phase's step as the benchmark does (random input, donated state),
runs `--warmup` steps, then traces `--steps` steps with jax.profiler. out_dir receives the
trace (XProf/TensorBoard format, `plugins/profile/<run>/*.xplane.pb`; open it in XProf or
read it with `jax.profiler.ProfileData`) and `profile_summary.json`: the wall time of a
traced step, the device time per step by kind of op (matmul, attention, fusion,
copy, collective, other), the HLO ops that take the most, and the JAX ops behind them
(the compiled program's `op_name` metadata, e.g. "jvp(Decoder)/decoder_blocks_*/mlp/mul"
for the decoder MLPs' forward). The summary is also printed.

Device time is the sum of the kernels' durations on the device planes, keyed by the HLO op
that launched them where the trace names it (`op_name`). Kernels on different streams may
overlap, so the sum can exceed the wall time; well below it, the device waits. A CPU
backend records no device plane: there the trace is written and the summary holds the
wall time only.
"""
import collections
import glob
import json
import os
import re
import time

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bridle_jax import benchmark
from bridle_jax import files

# Kinds of op, matched in order against the lower-cased op and kernel names.
KINDS = (("attention", ("fmha", "sdpa", "flash", "cudnn")),
         ("matmul", ("gemm", "cublas", "matmul", "dot", "nvjet", "xmma", "cutlass", "wgmma")),
         ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                         "collective-permute", "nccl")),
         ("copy", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice")),
         ("fusion", ("fusion",)))
# Lines of a device plane that repeat its kernels at a coarser grain.
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Framework Ops", "Framework Name Scope",
                 "Source code", "XLA TraceMe")


def kind_of(*names: str) -> str:
  text = " ".join(names).lower()
  return next((kind for kind, marks in KINDS if any(m in text for m in marks)), "other")


def op_name(stats: dict, kernel: str) -> str:
  """The HLO op behind a kernel event: its `hlo_op` stat, else the one named in its
  `annotation` (XLA's scoped annotation, nested scopes joined by "::"), else the kernel.

  Kernels that XLA:GPU launches inside a command buffer (a CUDA graph) all name that
  buffer as their op; each is named by its kernel instead, which for a fusion is the
  fusion's name with '.' as '_'.
  """
  name = _named_op(stats) or kernel
  return kernel if name.startswith("command_buffer") else name


def _named_op(stats: dict) -> str:
  if stats.get("hlo_op"):
    return str(stats["hlo_op"])
  annotation = str(stats.get("annotation", ""))
  named = re.findall(r"hlo_op=([^,#]+)", annotation)
  if named:
    return named[-1]
  return annotation.split("::")[-1].split("#")[0].strip()


def _key(name: str) -> str:
  """An HLO instruction or kernel name with '.' and '-' as '_' (how kernels spell them)."""
  return re.sub(r"[.\-]", "_", name)


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """{instruction key: the JAX op that made it} from a compiled program's HLO text.

  The source is the instruction's `op_name` metadata without the jit prefix and with
  block numbers as '*' (e.g. "transpose(jvp(Decoder))/decoder_blocks_*/mlp/fc1/...").
  """
  sources = {}
  for name, source in re.findall(
      r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name="([^"]*)"', hlo_text,
      re.MULTILINE):
    source = re.sub(r"^jit\([^)]*\)/", "", source)
    sources[_key(name)] = re.sub(r"(blocks)_\d+", r"\1_*", source)
  return sources


def device_events(profile) -> list[tuple[str, str, float]]:
  """(op, kernel, duration ns) of every kernel on the trace's device planes."""
  events = []
  for plane in profile.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if line.name in DERIVED_LINES:
        continue
      for event in line.events:
        events.append((op_name(dict(event.stats), event.name), event.name,
                       event.duration_ns))
  return events


def summarize(profile, steps: int, step_seconds: float, top: int,
              sources: dict[str, str] | None = None) -> dict:
  """Device time per step by kind, for the `top` costliest ops and, given `hlo_sources`
  of the traced program, for the `top` costliest JAX ops behind them, in milliseconds.
  Kernels without a source (library calls inside command buffers) count as
  "(<kind>, no source)"."""
  sources = sources or {}
  by_op = collections.defaultdict(float)
  kernels = {}
  for op, kernel, duration in device_events(profile):
    by_op[op] += duration
    kernels.setdefault(op, kernel)
  by_kind = collections.defaultdict(float)
  by_source = collections.defaultdict(float)
  for op, duration in by_op.items():
    kind = kind_of(op, kernels[op])
    by_kind[kind] += duration
    by_source[sources.get(_key(op), f"({kind}, no source)")] += duration
  total = sum(by_op.values())
  if not by_op:
    logging.warning("the trace has no device plane (a CPU backend): only wall time summarised")
  per_step_ms = lambda ns: ns / steps / 1e6
  ranked = sorted(by_op.items(), key=lambda item: -item[1])[:top]
  return {
      "steps": steps,
      "wall_ms_per_step": 1e3 * step_seconds,
      "device_ms_per_step": per_step_ms(total),
      "by_kind_ms_per_step": {k: per_step_ms(v) for k, v in
                              sorted(by_kind.items(), key=lambda item: -item[1])},
      "top_ops": [{"op": op, "kernel": kernels[op], "kind": kind_of(op, kernels[op]),
                   "ms_per_step": per_step_ms(ns), "share": ns / total if total else 0.0}
                  for op, ns in ranked],
      "top_sources": [{"source": source, "ms_per_step": per_step_ms(ns),
                       "share": ns / total if total else 0.0}
                      for source, ns in sorted(by_source.items(), key=lambda i: -i[1])[:top]],
  }


def format_summary(summary: dict) -> str:
  lines = [f"wall time per step    {summary['wall_ms_per_step']:.2f} ms",
           f"device time per step  {summary['device_ms_per_step']:.2f} ms (kernels summed)"]
  lines += [f"  {kind:<12} {ms:9.2f} ms" for kind, ms in summary["by_kind_ms_per_step"].items()]
  lines.append("top ops (ms per step, share of device time, kind, op, kernel):")
  lines += [f"  {o['ms_per_step']:8.3f}  {100 * o['share']:5.1f}%  {o['kind']:<10} "
            f"{o['op'][:60]}  {o['kernel'][:60]}" for o in summary["top_ops"]]
  if summary["top_sources"]:
    lines.append("top JAX ops (ms per step, share of device time, op_name):")
    lines += [f"  {o['ms_per_step']:8.3f}  {100 * o['share']:5.1f}%  {o['source'][:110]}"
              for o in summary["top_sources"]]
  return "\n".join(lines)


def profile_phase(config, kind: str, batch: int, out_dir: str, steps: int, warmup: int,
                  top: int) -> dict:
  """Traces `steps` steps of the phase into out_dir; returns (and writes) the summary."""
  _, state, device_batch, lr_schedule, lowered = benchmark.lower_phase(config, kind, batch)
  programs = [program.compile() for program in lowered]
  cycle = benchmark.step_cycle(config, kind, programs)

  def run(first, n):
    nonlocal state
    for i in range(first, first + n):
      state, _, _ = cycle[i % len(cycle)](state, device_batch, lr_schedule)
    jax.block_until_ready(state)

  run(0, warmup)
  before = set(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True))
  with jax.profiler.trace(out_dir):
    start = time.perf_counter()
    run(warmup, steps)
    step_seconds = (time.perf_counter() - start) / steps
  traces = set(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True)) - before
  if not traces:
    raise RuntimeError(f"jax.profiler wrote no trace under {out_dir}")
  profile = jax.profiler.ProfileData.from_file(max(traces, key=os.path.getmtime))
  sources = {}
  for program in programs:
    sources.update(hlo_sources(program.as_text()))
  summary = summarize(profile, steps, step_seconds, top, sources)
  summary.update(phase=kind, batch=batch, device=jax.devices()[0].device_kind,
                 dtype=config.model.dtype)
  files.write_atomic(os.path.join(out_dir, "profile_summary.json"),
                     json.dumps(summary, indent=1).encode())
  return summary


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py:demo.")
  flags.DEFINE_enum("phase", "encoder", ["encoder", "tokenizer", "joint"], "Phase to trace.")
  flags.DEFINE_integer("batch", 64, "Global batch size.")
  flags.DEFINE_integer("steps", 3, "Traced steps.")
  flags.DEFINE_integer("warmup", 2, "Untraced steps first.")
  flags.DEFINE_integer("top", 25, "Ops listed.")
  flags.DEFINE_string("out_dir", None, "Directory for the trace and profile_summary.json.")


def main(argv):
  del argv
  if flags.FLAGS.steps < 1:
    raise app.UsageError("--steps must be at least 1")
  os.makedirs(flags.FLAGS.out_dir, exist_ok=True)
  summary = profile_phase(flags.FLAGS.config, flags.FLAGS.phase, flags.FLAGS.batch,
                          flags.FLAGS.out_dir, flags.FLAGS.steps, flags.FLAGS.warmup,
                          flags.FLAGS.top)
  print(format_summary(summary))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "out_dir"])
  app.run(main)
