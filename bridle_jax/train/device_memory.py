"""A step that does not fit the device, reported by the config fields that change that."""
import contextlib

import jax


class OutOfDeviceMemory(ValueError):
  """A ValueError, so `bridle_jax.main` reports it as one `error:` line (exit code 2)."""


def is_out_of_memory(error: BaseException) -> bool:
  """XLA's allocation failure, raised when a step is compiled or run."""
  return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@contextlib.contextmanager
def fields_on_out_of_memory(section: str, batch_size: int, shards: int,
                            grad_accum: int | None = None):
  """Turns an out-of-memory error inside into OutOfDeviceMemory naming `section`'s fields.

  `shards` is the number of data-parallel devices; `grad_accum` None for a section that
  has none (fine-tuning).
  """
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if not is_out_of_memory(e):
      raise
    micro = batch_size // (shards * (grad_accum or 1))
    if grad_accum is None:
      setting, remedy = f"{section}.batch_size={batch_size}", f"lower {section}.batch_size"
    else:
      setting = f"{section}.batch_size={batch_size}, {section}.grad_accum={grad_accum}"
      remedy = (f"raise {section}.grad_accum (the steps each batch is split into) or lower "
                f"{section}.batch_size")
    raise OutOfDeviceMemory(
        f"{section}: out of device memory with {setting} ({micro} samples per device per "
        f"step); {remedy}, or set model.remat=full; checkpoints written so far are "
        f"kept. XLA said: {str(e).splitlines()[0][:300]}") from e
