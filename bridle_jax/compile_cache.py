"""JAX's persistent compilation cache, pointed at the run's `compile_cache_dir`.

A resumed or restarted run then loads its compiled train steps from disk instead of
compiling them again (minutes per program for ViT-B on a GPU; XLA:GPU's autotuning
results go there too). Only process 0 writes entries; programs that compile in under
`jax_persistent_cache_min_compile_time_secs` (1 s by default) are not kept. A directory
the process already names (`JAX_COMPILATION_CACHE_DIR`, or `jax.config` set by the
caller) wins over the config. Entries are keyed by the program, the devices, the
library versions and XLA's flags, so a changed config or install compiles anew. A
process killed while writing an entry leaves it unreadable: JAX then warns and compiles
as if it were absent; deleting the directory is always safe.
"""
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from bridle_jax import config_validation

_set_here: str | None = None  # the directory `enable` last gave JAX


def enable(directory: str) -> None:
  """Makes JAX cache compiled programs in `directory` ('' turns the cache off unless the
  process names one)."""
  current = jax.config.jax_compilation_cache_dir
  if current and current != _set_here:
    return
  if not directory:
    if current:
      _switch(None)
    return
  directory = os.path.abspath(directory)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise config_validation.ConfigError(
        f"compile_cache_dir: cannot create {directory}: {e.strerror or e}") from e
  if directory != current:
    _switch(directory)


def _switch(directory: str | None) -> None:
  global _set_here
  jax.config.update("jax_compilation_cache_dir", directory)
  compilation_cache.reset_cache()  # JAX opens the directory once, at the next compile
  _set_here = directory
