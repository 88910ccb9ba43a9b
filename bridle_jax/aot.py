"""Compiles a phase's train step for an accelerator this machine does not have.

  python -m bridle_jax.aot --config=configs/audio.py --phase=encoder --batch=128,256 --target=h100
  python -m bridle_jax.aot --config=configs/audio.py --phase=tokenizer --batch=1024 \
      --target=v5p:2x2x4 --config.mesh.fsdp=-1 --config.mesh.data=1

The step is the one training runs (`benchmark.phase_programs`: the config's mesh and
sharding rules over the target's devices, donated state), traced with the models' choices
for the target's platform (cuDNN attention and the Pallas window kernel on a GPU) and
compiled by XLA for it; no device is used, so it runs on a laptop. For each batch size it
prints what one device needs at peak by the compiled program's memory plan against what
the device has, and the step's kernels by kind with the bytes they read and write (see
`hlo_kernels`). Targets: `aot_targets` (GPU models, TPU topologies).
"""
import copy
import os

import jax
from absl import app
from absl import flags
from ml_collections import config_flags

from bridle_jax import aot_targets
from bridle_jax import benchmark
from bridle_jax import config_validation
from bridle_jax import files
from bridle_jax import hlo_kernels
from bridle_jax.models import platform
from bridle_jax.train import device_memory
from bridle_jax.train import sharding

GPU_MEMORY_FRACTION = 0.75  # what XLA's GPU allocator takes unless told otherwise


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py.")
  flags.DEFINE_enum("phase", "encoder", ["encoder", "tokenizer", "joint"], "Phase to compile.")
  flags.DEFINE_list("batch", ["64"], "Global batch size, or several (64,128,256).")
  flags.DEFINE_string("target", "h100", "h100, h200, h100:8 (GPUs per host), h100:2x8 "
                      "(hosts x GPUs), or a TPU topology such as v5e:2x2 or v5p:2x2x4.")
  flags.DEFINE_string("hlo_dir", None, "Write each compiled program's HLO text here.")


def gpu_compiler_flags(xla_flags: str) -> str:
  """XLA_FLAGS with matmuls as cuBLAS calls unless the flags choose: without a device XLA
  cannot time Triton's tilings against cuBLAS, and its untimed Triton tiling fails on
  some small matmuls."""
  if "xla_gpu_enable_triton_gemm" in xla_flags:
    return xla_flags
  return f"{xla_flags} --xla_gpu_enable_triton_gemm=false".strip()


def usable_memory(target: aot_targets.Target, environ) -> int:
  """Bytes of a device the program may use: on a GPU the share XLA's allocator takes
  (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75), on a TPU all of it."""
  if target.platform != "gpu":
    return target.memory_per_device
  try:
    fraction = float(environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
  except ValueError as e:
    raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION: {e}") from e
  return int(fraction * target.memory_per_device)


def compile_phase(config, kind: str, batch: int, mesh, target_platform: str) -> list:
  """[(lowered, compiled)] of the phase's steps on `mesh` (a joint phase has two). With
  `grad_accum` > 1 the lowered program is the same step without accumulation (the same
  work), since cost analysis counts a loop's body once."""
  # The kernel choice happens in compile too. The abstract mesh names the target's device
  # kind to the Pallas GPU kernel's lowering, which in jax 0.11.2 otherwise asks for a GPU.
  with platform.compiling_for(target_platform), jax.sharding.use_abstract_mesh(
      mesh.abstract_mesh):
    phase = benchmark.phase_programs(config, kind, batch, mesh)
    state = benchmark.abstract_state(phase)
    lowered = [step.lower(state, phase.batch, phase.schedule) for step in phase.steps]
    compiled = [program.compile() for program in lowered]
    if config[f"{kind}_phase"].grad_accum > 1:
      config = copy.deepcopy(config)
      config[f"{kind}_phase"].grad_accum = 1
      phase = benchmark.phase_programs(config, kind, batch, mesh)
      lowered = [step.lower(state, phase.batch, phase.schedule) for step in phase.steps]
  return list(zip(lowered, compiled))


def program_report(lowered, compiled, target: aot_targets.Target, usable: int) -> dict:
  """Peak memory per device, model FLOPs and kernels of one compiled step."""
  memory = compiled.memory_analysis()
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {
      "state_and_inputs_bytes": memory.argument_size_in_bytes,
      "temporary_bytes": memory.temp_size_in_bytes,
      "peak_bytes": peak, "usable_bytes": usable, "fits": peak <= usable,
      "flops": benchmark.cost_flops(lowered),
      "kernels": hlo_kernels.kernel_table(compiled.as_text()),
  }


def _memory(num_bytes: float) -> str:
  if num_bytes >= aot_targets.GIB:
    return f"{num_bytes / aot_targets.GIB:.2f} GiB"
  return f"{num_bytes / 2 ** 20:.1f} MiB"


def format_report(report: dict, target: aot_targets.Target) -> str:
  lines = [
      f"{report['name']}: global batch {report['batch']} on {len(target.devices)} x "
      f"{target.device_kind}, mesh {report['mesh']}",
      f"  memory per device at peak: {_memory(report['peak_bytes'])} (state and inputs "
      f"{_memory(report['state_and_inputs_bytes'])}, temporaries "
      f"{_memory(report['temporary_bytes'])}) of {_memory(report['usable_bytes'])} usable: "
      f"{'fits' if report['fits'] else 'DOES NOT FIT'}",
      f"  model FLOPs per step, all devices: {report['flops'] / 1e9:,.1f} GFLOP",
      "  kernels per step and device        count    GB moved"]
  for kind, (count, moved) in report["kernels"].items():
    lines.append(f"    {kind:28s} {count:8d} {moved / 1e9:11.3f}")
  if "host transfer" not in report["kernels"]:
    lines.append("  no host transfers in the step")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  jax.config.update("jax_platforms", "cpu")  # the target's devices are never opened
  os.environ["XLA_FLAGS"] = gpu_compiler_flags(os.environ.get("XLA_FLAGS", ""))
  config = flags.FLAGS.config
  try:
    batches = sorted(int(b) for b in flags.FLAGS.batch)
  except ValueError as e:
    raise app.UsageError(f"--batch takes integers: {e}") from e
  try:
    config_validation.validate_config(config, data_paths=False)
    target = aot_targets.resolve(flags.FLAGS.target)
    usable = usable_memory(target, os.environ)
    mesh = sharding.make_mesh(config.mesh, target.devices)
    for batch in batches:
      sharding.check_batch_divides("--batch", batch, mesh)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  kind = flags.FLAGS.phase
  mesh_text = " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items())
  for batch in batches:
    try:
      programs = compile_phase(config, kind, batch, mesh, target.platform)
    except jax.errors.JaxRuntimeError as e:  # TPU compilers refuse what does not fit
      if not device_memory.is_out_of_memory(e):
        raise
      print(f"{kind}: global batch {batch} on {len(target.devices)} x {target.device_kind}: "
            f"DOES NOT FIT. XLA said: {str(e).splitlines()[0][:300]}\n", flush=True)
      continue
    names = [kind] if len(programs) == 1 else [kind, f"{kind} without the tokenizer term"]
    for name, (lowered, compiled) in zip(names, programs):
      report = program_report(lowered, compiled, target, usable)
      report.update(name=name, batch=batch, mesh=mesh_text)
      print(format_report(report, target) + "\n", flush=True)
      if flags.FLAGS.hlo_dir:
        os.makedirs(flags.FLAGS.hlo_dir, exist_ok=True)
        path = os.path.join(flags.FLAGS.hlo_dir, f"{name.replace(' ', '_')}_{batch}.hlo")
        files.write_atomic(path, compiled.as_text().encode())


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
