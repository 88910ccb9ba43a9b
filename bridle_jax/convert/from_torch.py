"""Imports an official BRIDLE PyTorch checkpoint as a finished phase of a new workdir.

  python -m bridle_jax.convert.from_torch --checkpoint=checkpoint-140.pth --workdir=NEW_DIR \
      [--config=configs/audio.py] [--phase_kind=tokenizer]

The checkpoint is an official pretraining state dict (official_impl.md Appendix A): a .pth
holding {'model': state dict, ...} (other entries such as 'args' or 'optimizer' are ignored)
or a bare state dict, or a .safetensors file (read without torch). It becomes the params and
codebooks of phase `p1_<phase_kind>` of NEW_DIR, saved like a training run's
`checkpoints/<phase>_final`, with the config in NEW_DIR/config.json, so

  python -m bridle_jax.main --config=configs/audio.py --workdir=RUN \
      --config.init_from=NEW_DIR ...

continues from it when its `model` config equals the imported one
(`bridle_jax.workdir.load_pretrained(NEW_DIR)` reads it too). The config
(default: configs/audio.py, the audio ViT-B recipe) must describe the checkpoint's model:
every key must be present with the shape the config implies, and the stored sin-cos tables
must equal `model.pos_grid`'s; otherwise the import fails naming the key. `initted` keys
are optional (the official model has them only with --kmeans_init); `embed_ema` and the
codebook padding row are never read by the official code and are dropped.

--phase_kind tells later phases what the checkpoint has been through: `tokenizer` (default)
for checkpoints whose tokenizer was trained (iteration-2 tokenizer or encoder checkpoints),
so a following encoder phase uses the trained tokenizer and its codebooks; `joint` likewise,
for dual-training checkpoints; `encoder` for an iteration-1 (cold-start) checkpoint, so a
following encoder phase keeps the cold-start tokenizer.
"""
import argparse
import importlib.util
import os
import pathlib
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from bridle_jax import convert
from bridle_jax import workdir as workdir_lib
from bridle_jax.convert import layout
from bridle_jax.models import quantizer
from bridle_jax.train import checkpoint
from bridle_jax.train import state as state_lib

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "audio.py"
PHASE_KINDS = ("encoder", "tokenizer", "joint")
_POS_ATOL = 1e-5
_PATHS = (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath)
# Under the names a checkpoint pickled on Python < 3.13 uses too: newer Pythons define
# these classes in pathlib._local.
_ARGS_TYPES = [argparse.Namespace, *_PATHS, *((cls, f"pathlib.{cls.__name__}") for cls in _PATHS)]


def default_config():
  """The audio recipe of configs/audio.py in the source tree."""
  if not DEFAULT_CONFIG.exists():
    raise FileNotFoundError(f"{DEFAULT_CONFIG}: not found; pass --config")
  spec = importlib.util.spec_from_file_location("bridle_audio_config", DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Official state dict from a .safetensors or .pth file, as float32 NumPy arrays."""
  if path.endswith(".safetensors"):
    safetensors_numpy = convert.import_optional("safetensors.numpy")
    return {k: np.asarray(v, np.float32) for k, v in safetensors_numpy.load_file(path).items()}
  torch = convert.import_optional("torch")
  # Official checkpoints carry their argparse.Namespace as 'args'; under the official
  # submitit launchers it holds pathlib paths (output_dir, log_dir).
  with torch.serialization.safe_globals(_ARGS_TYPES):
    try:
      loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      reason = next((line.strip() for line in str(e).splitlines() if "Unsupported" in line),
                    str(e).strip().splitlines()[0])
      raise ValueError(f"{path}: a weights-only load refuses it ({reason}); only tensors "
                       "and the official 'args' are read") from e
  state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict or {{'model': state dict}}")
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _check_keys(state: dict, entries: list, num_codebooks: int) -> None:
  optional = {f"tokenizer.quantizer.codebooks.{s}.initted" for s in range(num_codebooks)}
  expected = {entry.key for entry in entries}
  missing = sorted(expected - set(state) - optional)
  unexpected = sorted(set(state) - expected - optional)
  if missing or unexpected:
    raise ValueError(
        f"checkpoint keys do not match the config's official layout: missing {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); is --config the "
        "checkpoint's model (size, decoder mode, quantizer)?")


def _check_shape(key: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"{key}: shape {tuple(value.shape)} in the checkpoint, {tuple(shape)} "
                     "expected by the config")


def from_state_dict(state: dict, config) -> dict:
  """Official pretraining state dict -> {'params', 'codebooks'} (NumPy / CodebookState).

  Raises ValueError naming the key on a missing or unexpected key, a shape that the config
  does not imply, or a sin-cos table that differs from the config's.
  """
  entries = layout.pretrain_layout(config)
  _check_keys(state, entries, config.model.quantizer.num_codebooks)
  models = state_lib.build_models(config)
  abstract = nn.unbox(workdir_lib.abstract_pretrained(models))
  spec = models.quantizer
  num_codes, dim = spec.codebook_size, spec.code_dim
  codebook_shapes = {"weight": (num_codes + 1, dim), "cluster_size_ema": (num_codes,),
                     "embed_ema": (num_codes, dim), "initted": (1,)}
  params = {}
  rows = np.zeros((spec.num_codebooks, num_codes, dim), np.float32)
  sizes = np.zeros((spec.num_codebooks, num_codes), np.float32)
  initted = np.ones((spec.num_codebooks,), bool)
  for entry in entries:
    if entry.key not in state:  # an optional `initted`
      continue
    value = np.asarray(state[entry.key], np.float32)
    if isinstance(entry, layout.ParamEntry):
      shape = layout.get_path(abstract["params"], entry.path).shape
      _check_shape(entry.key, value, entry.transform.torch_shape(shape))
      layout.set_path(params, entry.path, entry.transform.from_torch(value, shape))
    elif isinstance(entry, layout.PosEntry):
      table = entry.table()
      _check_shape(entry.key, value, table.shape)
      if not np.allclose(value, table, rtol=0.0, atol=_POS_ATOL):
        raise ValueError(f"{entry.key}: differs from the fixed sin-cos table of "
                         f"model.pos_grid={entry.pos_grid!r}")
    else:
      _check_shape(entry.key, value, codebook_shapes[entry.field])
      if entry.field == "weight":
        rows[entry.stage] = value[:num_codes]
      elif entry.field == "cluster_size_ema":
        sizes[entry.stage] = value
      elif entry.field == "initted":
        initted[entry.stage] = value[0] != 0
  codebooks = quantizer.CodebookState(codebooks=rows, cluster_size=sizes, initted=initted)
  return {"params": params, "codebooks": codebooks}


def write_workdir(workdir: str, config, tree: dict, phase_id: str, source: str) -> None:
  """Writes `tree` as the finished phase `phase_id` of the new `workdir`, as the driver
  writes `<phase>_final`, with `config` and a progress file naming `source`."""
  if os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    raise ValueError(f"{workdir} already holds a run; choose a new --workdir")
  workdir_lib.save_config(config, workdir)
  final = checkpoint.PhaseCheckpointer(workdir_lib.final_dir(workdir, phase_id),
                                       save_every=1, keep=1, async_save=False)
  final.save(0, jax.tree.map(jnp.asarray, tree), None, force=True)
  final.close()
  checkpoint.write_progress(workdir, {
      "completed": [phase_id],
      "phases": {phase_id: {"imported_from": source, "steps": 0}}})


def import_checkpoint(path: str, workdir: str, config=None,
                      phase_kind: str = "tokenizer") -> str:
  """Reads an official checkpoint and writes it as phase p1_<phase_kind> of the new
  `workdir` (config: default configs/audio.py). Returns the phase id."""
  if phase_kind not in PHASE_KINDS:
    raise ValueError(f"phase_kind {phase_kind!r} is not one of {', '.join(PHASE_KINDS)}")
  config = config if config is not None else default_config()
  tree = from_state_dict(read_state_dict(path), config)
  phase_id = f"p1_{phase_kind}"
  write_workdir(workdir, config, tree, phase_id, os.path.abspath(path))
  return phase_id


def define_flags() -> None:
  """The command's flags (defined only when run as a command: absl flags are global)."""
  flags.DEFINE_string("checkpoint", None,
                      "Official state dict: .pth (needs torch) or .safetensors.")
  flags.DEFINE_string("workdir", None, "New workdir to write the imported phase to.")
  config_flags.DEFINE_config_file(
      "config", None, "Config describing the checkpoint's model (default: configs/audio.py).")
  flags.DEFINE_enum("phase_kind", "tokenizer", list(PHASE_KINDS),
                    "Kind of the imported phase: tokenizer (the checkpoint's tokenizer is "
                    "trained) or encoder (iteration-1 cold start).")
  flags.mark_flags_as_required(["checkpoint", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS

  def action():
    phase_id = import_checkpoint(f.checkpoint, f.workdir, f.config, f.phase_kind)
    return {"workdir": f.workdir, "phase": phase_id, "checkpoint": f.checkpoint}

  convert.run_command(action)


if __name__ == "__main__":
  define_flags()
  app.run(main)
