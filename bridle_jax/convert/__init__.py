"""Checkpoint conversion to and from the official BRIDLE PyTorch layout.

  to_torch         a finished phase of a workdir -> official pretraining and fine-tuning
                   state dicts (.pth and .safetensors)
  from_torch       an official state dict -> a finished phase of a new workdir
  layout           the key map and per-key array transforms both directions share
  torch_reference  PyTorch modules with the official names, for parity checks

PyTorch is optional (`pip install 'bridle_jax[torch]'`); only what reads or writes PyTorch
files imports it.
"""
import importlib
from types import ModuleType

INSTALL_HINT = ("PyTorch export/import needs torch and safetensors: "
                "pip install 'bridle_jax[torch]'")


class MissingDependency(ImportError):
  """torch or safetensors is not installed; the message is the install hint."""


def import_optional(name: str) -> ModuleType:
  """Imports `name` (e.g. torch, safetensors.torch) or raises MissingDependency."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise MissingDependency(f"{INSTALL_HINT} ({name} cannot be imported)") from e
