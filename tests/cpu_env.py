"""XLA settings for the test processes: emulated CPU devices, quick compilation."""
import os

# The suite compiles hundreds of small programs and runs each for a few steps: XLA:CPU's
# MLIR fusion emitters and LLVM's optimisation passes cost more time than they save.
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_llvm_disable_expensive_passes=true",
                       "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a CPU process with `devices` emulated devices."""
  return " ".join((f"--xla_force_host_platform_device_count={devices}",) + QUICK_COMPILE_FLAGS)


def subprocess_env(devices: int) -> dict[str, str]:
  """This process's environment for a CPU child process with `devices` devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
