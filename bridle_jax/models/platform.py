"""The platform a traced program is built for: this process's default backend, or, inside
`compiling_for`, the target of an ahead-of-time compile (`bridle_jax.aot`). The models'
'auto' choices (cuDNN attention, the Pallas window kernel) and the kernel's interpreter
switch ask here, so a program compiled for a GPU on a CPU machine takes the GPU paths;
the jitted steps take their XLA options for it from `compiler_options`.
"""
import contextlib
import os

import jax

# XLA:GPU merges matmuls that share an operand while their outputs stay under 32 MB (its
# default threshold; below about 40 samples per device for ViT-B's 513 tokens): the ViTs'
# q, k and v projections then become one matmul whose slices are copied before cuDNN.
# Compiled for an H100 at 32 samples, that merging added 8.2 GB (10 %) to the bytes a
# tokenizer step moves and 3.8 GB (6 %) to an encoder step's. The steps set this
# threshold (XLA's option name) to 0.
MATMUL_MERGER_THRESHOLD = "xla_gpu_dot_merger_threshold_mb"
# `model.gpu_matmuls`: 'auto' lets XLA:GPU's autotuner pick Triton or cuBLAS per matmul;
# 'cublas' makes every matmul a cuBLAS call, into which XLA folds bias adds, the bf16
# residual add and the tanh GELU (`model.gelu=tanh`) as epilogues.
GPU_MATMULS = ("auto", "cublas")
TRITON_MATMULS = "xla_gpu_enable_triton_gemm"

_target: str | None = None


def backend() -> str:
  """'gpu', 'tpu' or 'cpu'."""
  return _target or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Traces inside this block build programs for `platform` ('gpu', 'tpu' or 'cpu')."""
  global _target
  if platform not in ("gpu", "tpu", "cpu"):
    raise ValueError(f"platform {platform!r} is not one of 'gpu', 'tpu', 'cpu'")
  previous, _target = _target, platform
  try:
    yield
  finally:
    _target = previous


def compiler_options(gpu_matmuls: str = "auto") -> dict:
  """XLA options for the steps compiled for `backend()`: on a GPU no merging of matmuls,
  and with `gpu_matmuls='cublas'` no Triton matmuls; an option XLA_FLAGS sets wins."""
  if backend() != "gpu":
    return {}
  if gpu_matmuls not in GPU_MATMULS:
    raise ValueError(f"model.gpu_matmuls={gpu_matmuls!r} is not one of "
                     f"{', '.join(map(repr, GPU_MATMULS))}")
  options = {MATMUL_MERGER_THRESHOLD: 0}
  if gpu_matmuls == "cublas":
    options[TRITON_MATMULS] = False
  xla_flags = os.environ.get("XLA_FLAGS", "")
  return {name: value for name, value in options.items() if name not in xla_flags}


def model_compiler_options(model_cfg) -> dict:
  """`compiler_options` for a model config (`model.gpu_matmuls`, 'auto' where absent)."""
  return compiler_options(model_cfg.get("gpu_matmuls", "auto"))
