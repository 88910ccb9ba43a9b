"""XLA settings for the test processes: emulated CPU devices, quick compilation."""
from importlib import metadata
import os


def _jaxlib_before(major: int, minor: int) -> bool:
  version = metadata.version("jaxlib").split(".")
  return (int(version[0]), int(version[1])) < (major, minor)


# The suite compiles hundreds of small programs and runs each for a few steps: XLA:CPU's
# MLIR fusion emitters and LLVM's optimisation passes cost more time than they save.
# jaxlib 0.11.2 no longer knows the emitters' switch, and XLA aborts on unknown flags.
# There, an FFT's pieces go to the thread pool that runs the emulated devices, and the FFT
# blocks until they are done: with 8 devices, the training step's fbank FFTs and a
# collective took every thread of the pool and waited forever. Single-threaded Eigen
# keeps each FFT on its own thread.
QUICK_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_llvm_disable_expensive_passes=true",
                       *(("--xla_cpu_use_fusion_emitters=false",) if _jaxlib_before(0, 11)
                         else ("--xla_cpu_multi_thread_eigen=false",)))


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a CPU process with `devices` emulated devices."""
  return " ".join((f"--xla_force_host_platform_device_count={devices}",) + QUICK_COMPILE_FLAGS)


def subprocess_env(devices: int) -> dict[str, str]:
  """This process's environment for a CPU child process with `devices` devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
