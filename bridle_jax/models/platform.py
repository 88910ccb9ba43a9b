"""The platform a traced program is built for: this process's default backend, or, inside
`compiling_for`, the target of an ahead-of-time compile (`bridle_jax.aot`). The models'
'auto' choices (cuDNN attention, the Pallas window kernel) and the kernel's interpreter
switch ask here, so a program compiled for a GPU on a CPU machine takes the GPU paths.
"""
import contextlib

import jax

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
