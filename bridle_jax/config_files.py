"""Loads one recipe of configs/ from another, whatever the working directory.

Config files are given by path (`--config=/path/to/configs/image.py`) and loaded without
their folder on sys.path, so `from configs import audio` works only from the checkout's
root; `sibling(__file__, "audio")` loads the audio.py beside the calling config instead.
"""
import importlib.util
import os
import types


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The module of `<name>.py` in the folder of `config_file` (freshly executed)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"bridle_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
