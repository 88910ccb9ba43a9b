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
import json
import sys
from types import ModuleType
from typing import Callable

from absl import logging

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


def run_command(action: Callable[[], dict]) -> None:
  """Runs a conversion; prints its result as JSON, or one `error:` line and exits
  (1: torch or safetensors missing, 2: bad workdir, key or shape)."""
  logging.set_verbosity(logging.WARNING)  # keep orbax's per-file INFO lines out
  try:
    result = action()
  except MissingDependency as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result, indent=1))
