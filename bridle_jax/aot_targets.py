"""Accelerators to compile for without having one: GPU models and Cloud TPU topologies.

A target is named `h100`, `h200` (one GPU), `h100:8` (8 GPUs on one host), `h100:2x8` (2
hosts of 8), or a TPU topology as libtpu names it, `<version>:<chips>` such as `v5e:2x2`,
`v5p:2x2x4` or `v4:4x4x4` (libtpu lays a v4 chip out as two devices, one per TensorCore,
where a v4 slice at run time has one per chip). GPU targets need jax's CUDA plugin (`pip
install 'jax[cuda12]'` or `'jax[cuda13]'`), TPU targets libtpu (`pip install
'jax[tpu]'`); neither opens a device.
"""
import dataclasses
import math
import os
import re

from jax.experimental import topologies

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class GpuModel:
  """What XLA's GPU compiler needs to know of a GPU model (its `GpuTargetConfig`)."""
  description: str  # the device kind as the CUDA runtime reports it
  sm_count: int
  memory_bytes: int  # total device memory
  bandwidth_bytes_per_s: float
  l2_cache_bytes: int
  clock_ghz: float
  compute_capability: tuple[int, int]
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int


GPU_MODELS = {
    "h100": GpuModel("NVIDIA H100 80GB HBM3", 132, 84_929_347_584, 3.35e12, 50 * 2 ** 20,
                     1.98, (9, 0), 233_472, 232_448),
    "h200": GpuModel("NVIDIA H200", 132, 150_754_820_096, 4.8e12, 50 * 2 ** 20, 1.98, (9, 0),
                     233_472, 232_448),
}

# HBM per chip (GiB) by TPU device kind; a chip with two devices gives each half.
TPU_HBM_GIB = {"TPU v2": 16, "TPU v3": 32, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
               "TPU v6 lite": 32}

_GPU_TARGET = re.compile(r"^(?P<model>[a-z0-9]+)(:((?P<hosts>\d+)x)?(?P<devices>\d+))?$")
_TPU_TARGET = re.compile(r"^v\d+[a-z]*:\d+(x\d+)*$")


@dataclasses.dataclass(frozen=True)
class Target:
  platform: str  # 'gpu' or 'tpu': what the models' 'auto' choices are made for
  devices: list
  device_kind: str
  memory_per_device: int  # bytes


def gpu_target_config(model: GpuModel) -> str:
  """The `GpuTargetConfig` text proto XLA compiles for when no GPU is present."""
  major, minor = model.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {model.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {model.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(model.bandwidth_bytes_per_s)}
  l2_cache_size: {model.l2_cache_bytes}
  clock_rate_ghz: {model.clock_ghz}
  device_memory_size: {model.memory_bytes}
  shared_memory_per_block_optin: {model.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{model.description}"
"""


def _gpu(model_name: str, hosts: int, per_host: int) -> Target:
  model = GPU_MODELS[model_name]
  try:
    topology = topologies.get_topology_desc(
        platform="cuda", topology=f"1x{hosts}x{per_host}",
        target_config=gpu_target_config(model))
  except Exception as e:  # the plugin's absence shows up as one of several error types
    raise ValueError(f"--target={model_name}: compiling for a GPU needs jax's CUDA plugin "
                     f"(pip install 'jax[cuda12]' or 'jax[cuda13]'): {e}") from e
  return Target("gpu", list(topology.devices), model.description, model.memory_bytes)


def _tpu(name: str) -> Target:
  # libtpu locks a file so that one process owns the chips; compiling opens none.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:
    raise ValueError(f"--target={name}: compiling for a TPU needs libtpu (pip install "
                     f"'jax[tpu]') and a topology it knows, such as v5e:2x2: {e}") from e
  devices = list(topology.devices)
  kind = devices[0].device_kind
  if kind not in TPU_HBM_GIB:
    raise ValueError(f"--target={name}: no HBM size known for {kind!r}")
  chips = math.prod(int(n) for n in name.split(":")[1].split("x"))
  return Target("tpu", devices, kind, TPU_HBM_GIB[kind] * GIB * chips // len(devices))


def resolve(name: str) -> Target:
  """The devices and memory of target `name` (module docstring)."""
  name = name.strip().lower()
  if _TPU_TARGET.match(name):
    return _tpu(name)
  match = _GPU_TARGET.match(name)
  if not match or match["model"] not in GPU_MODELS:
    raise ValueError(f"--target={name!r} is neither a GPU ({', '.join(GPU_MODELS)}, "
                     "optionally :devices or :hostsxdevices) nor a TPU topology such as "
                     "v5e:2x2")
  return _gpu(match["model"], int(match["hosts"] or 1), int(match["devices"] or 1))
