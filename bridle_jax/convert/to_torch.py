"""Exports a finished phase of a workdir to the official BRIDLE PyTorch layout.

  python -m bridle_jax.convert.to_torch --workdir=DIR --output=bridle.pth [--phase=p3_encoder]
      [--finetune_output=FILE] [--num_classes=527 (1000 for images)] [--seed=0]
  python -m bridle_jax.convert.to_torch --workdir=FINETUNE_DIR --output=classifier.pth
      [--run=fold1]

From a pretraining workdir it writes (float32 tensors, key names, shapes and order of
official_impl.md Appendix A / B):
  bridle.pth                   {'model': state dict} of the official pretraining `BRIDLE`
                               (encoder_decoder.* + tokenizer.*; 644 keys for audio ViT-B)
  bridle.safetensors           the same tensors
  bridle_finetune.pth          {'model': state dict} of the official fine-tuning ViT
                               (152 keys for audio ViT-B, 527 classes); --finetune_output
                               renames it
  bridle_finetune.safetensors  the same tensors

The pretraining file loads into the official code with strict=True (`--resume`), through
`--prev_phase`, and is the file for the official fine-tuning's `--finetune` (which keeps the
`encoder_decoder.*` keys and strips that prefix); the fine-tuning file loads into
`model/vit.py` with strict=True. Beyond our
parameters it holds: the frozen sin-cos tables (`pos_embed`, `decoder_pos_embed`,
`estimator_pos_embed`, from `model.pos_grid`); per codebook a (K + 1)-row `weight` whose
padding row K is zero, `cluster_size_ema` = our cluster sizes, `embed_ema` = the code rows
(the official code never reads either) and, when model.quantizer.kmeans_init is set,
`initted` = 1.0 for initialised codebooks, so the official code does not re-run k-means.
No 'args' or 'optimizer' entries, so torch.load(weights_only=True) reads it. The key set
follows the workdir's config; the official code hard-codes some sizes (decoder mode 1: 16 Swin
blocks of 16 heads, 4x4 windows; 3 estimator blocks), which the audio default matches.
A run on images (configs/image.py) exports the official image layout: a 3-channel patch
conv, 197-row tables for 14x14 patches, decoder mode 0's 16 timm blocks; its fine-tuning
file has the same keys as audio's, with 1000 head rows by default.

The fine-tuning file takes the encoder without its final `norm` (the official fine-tuning ViT
pools the block outputs and applies a new `fc_norm`) and adds the new keys with the official
fine-tuning initialisation: `fc_norm` weight 1 / bias 0, `head` of --num_classes rows with a
N(0, 2e-5) weight (timm's trunc_normal_ bounds, +-2, never bind at that std; --seed seeds it)
and a zero bias.

From a fine-tuning or probe workdir (`--mode=finetune|probe`) it writes the trained
classifier of a finished run (`--run`, needed when there are several, as with k-fold) in the
official fine-tuning ViT layout, with its trained `fc_norm` and `head` (and `pos_embed`
where `finetune.learn_pos_embed` trained it, as image fine-tuning does): `classifier.pth`
and its `.safetensors` copy, for `model/vit.py` with strict=True at the run's input length.
"""
import collections
import os

import jax
import numpy as np
from absl import app
from absl import flags

from bridle_jax import convert
from bridle_jax import workdir as workdir_lib
from bridle_jax.convert import layout
from bridle_jax.data import inputs
from bridle_jax.evaluate import finetune as finetune_lib
from bridle_jax.train import checkpoint

HEAD_INIT_STD = 2e-5
DEFAULT_CLASSES = {"audio": 527, "image": 1000}  # AudioSet, ImageNet-1K

def _codebook_tensor(entry: layout.CodebookEntry, codebooks) -> np.ndarray:
  rows = np.asarray(codebooks.codebooks[entry.stage], np.float32)
  if entry.field == "weight":
    return np.concatenate([rows, np.zeros((1, rows.shape[1]), np.float32)])
  if entry.field == "cluster_size_ema":
    return np.asarray(codebooks.cluster_size[entry.stage], np.float32)
  if entry.field == "embed_ema":
    return rows
  return np.asarray([codebooks.initted[entry.stage]], np.float32)


def _entry_tensor(entry: layout.Entry, params: dict, codebooks=None) -> np.ndarray:
  if isinstance(entry, layout.ParamEntry):
    return np.asarray(entry.transform.to_torch(np.asarray(layout.get_path(params, entry.path))),
                      np.float32)
  if isinstance(entry, layout.PosEntry):
    return entry.table()
  return _codebook_tensor(entry, codebooks)


def pretrain_state_dict(config, tree: dict) -> dict[str, np.ndarray]:
  """{'params', 'codebooks'} -> the official pretraining state dict (ordered, float32 NumPy)."""
  return collections.OrderedDict(
      (entry.key, _entry_tensor(entry, tree["params"], tree["codebooks"]))
      for entry in layout.pretrain_layout(config))


def finetune_state_dict(config, params: dict, num_classes: int = 527,
                        seed: int = 0) -> dict[str, np.ndarray]:
  """Our encoder -> the official fine-tuning ViT state dict with a fresh fc_norm and head."""
  width = config.model.width
  state = collections.OrderedDict(
      (entry.key, _entry_tensor(entry, params))
      for entry in layout.finetune_backbone_layout(config))
  rng = np.random.default_rng(seed)
  state["fc_norm.weight"] = np.ones((width,), np.float32)
  state["fc_norm.bias"] = np.zeros((width,), np.float32)
  state["head.weight"] = HEAD_INIT_STD * rng.standard_normal((num_classes, width), np.float32)
  state["head.bias"] = np.zeros((num_classes,), np.float32)
  return state


def classifier_state_dict(config, params: dict) -> dict[str, np.ndarray]:
  """A fine-tuned classifier's params -> the official fine-tuning ViT state dict."""
  state = collections.OrderedDict(
      (entry.key, _entry_tensor(entry, {"encoder": params}))
      for entry in layout.finetune_backbone_layout(config))
  if "pos_embed" in params:  # learned (finetune.learn_pos_embed), CLS row first
    learned = np.asarray(params["pos_embed"], np.float32)
    rows = state["pos_embed"].shape[1]
    if len(learned) == rows - 1:  # saved before 2026-11-28, without its (zero) CLS row
      learned = np.concatenate([np.zeros_like(learned[:1]), learned])
    if learned.shape != state["pos_embed"].shape[1:]:
      raise ValueError(f"the classifier's pos_embed is {learned.shape}, its input grid needs "
                       f"{state['pos_embed'].shape[1:]}")
    state["pos_embed"] = learned[None]
  state["fc_norm.weight"] = np.asarray(params["fc_norm"]["scale"], np.float32)
  state["fc_norm.bias"] = np.asarray(params["fc_norm"]["bias"], np.float32)
  state["head.weight"] = np.asarray(params["head"]["kernel"], np.float32).T
  state["head.bias"] = np.asarray(params["head"]["bias"], np.float32)
  return state


def save_state_dict(state: dict[str, np.ndarray], path: str) -> str:
  """Writes `path` ({'model': tensors}) and the .safetensors copy next to it; returns the
  latter's path."""
  torch = convert.import_optional("torch")
  safetensors_torch = convert.import_optional("safetensors.torch")
  # Every tensor gets its own contiguous copy: safetensors rejects shared storage.
  tensors = collections.OrderedDict(
      (key, torch.from_numpy(np.array(value, np.float32, order="C")))
      for key, value in state.items())
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  torch.save({"model": tensors}, path)
  safetensors_path = os.path.splitext(path)[0] + ".safetensors"
  safetensors_torch.save_file(tensors, safetensors_path, metadata={"format": "pt"})
  return safetensors_path


def finetune_path(output: str) -> str:
  root, ext = os.path.splitext(output)
  return f"{root}_finetune{ext or '.pth'}"


def export(workdir: str, output: str, phase_id: str | None = None,
           finetune_output: str | None = None, num_classes: int | None = None,
           seed: int = 0, run_id: str | None = None) -> dict:
  """Exports phase `phase_id` (default: the last finished) of a pretraining `workdir`, or
  run `run_id` of a fine-tuning one; returns a summary with the written paths. The new
  head has `num_classes` rows (default: AudioSet's 527, or ImageNet's 1000 for images)."""
  for path in (output, finetune_output):
    if path and path.endswith(".safetensors"):
      raise ValueError(f"{path}: name the .pth file; the .safetensors copy goes next to it")
  convert.import_optional("torch")
  convert.import_optional("safetensors.torch")
  config = workdir_lib.load_config(workdir)
  if config.get("mode") in finetune_lib.MODES:
    if phase_id or finetune_output:
      raise ValueError(f"{workdir} is a {config.mode} workdir: it has runs, not phases; "
                       "name one with --run (--phase and --finetune_output are for "
                       "pretraining workdirs)")
    return export_classifier(workdir, config, output, run_id)
  if run_id:
    raise ValueError(f"{workdir} is a pretraining workdir: name a phase with --phase")
  config, _, tree = workdir_lib.load_pretrained(workdir, phase_id)
  phase_id = phase_id or workdir_lib.finished_phases(workdir)[-1]
  pretrain = pretrain_state_dict(config, tree)
  if num_classes is None:
    num_classes = DEFAULT_CLASSES[inputs.modality(config.data)]
  finetune = finetune_state_dict(config, tree["params"], num_classes, seed)
  finetune_output = finetune_output or finetune_path(output)
  if os.path.abspath(finetune_output) == os.path.abspath(output):
    raise ValueError(f"--finetune_output {finetune_output} is --output too; name two files")
  return {
      "workdir": workdir, "phase": phase_id,
      "pretrain": {"pth": output, "safetensors": save_state_dict(pretrain, output),
                   "keys": len(pretrain)},
      "finetune": {"pth": finetune_output,
                   "safetensors": save_state_dict(finetune, finetune_output),
                   "keys": len(finetune), "num_classes": num_classes},
  }


def export_classifier(workdir: str, config, output: str, run_id: str | None = None) -> dict:
  """Writes the trained classifier of finished run `run_id` (default: the only one)."""
  finished = sorted(checkpoint.read_progress(workdir).get("runs", {}))
  with_weights = [r for r in finished if os.path.isdir(workdir_lib.final_dir(workdir, r))]
  if run_id is None:
    if len(with_weights) != 1:
      raise ValueError(f"{workdir}: " + (f"name the run to export with --run (one of "
                                         f"{', '.join(with_weights)})" if with_weights else
                                         "no finished run with trained weights (a fast probe "
                                         "keeps none)"))
    run_id = with_weights[0]
  elif run_id not in with_weights:
    raise FileNotFoundError(f"{workdir}: run {run_id!r} is not a finished run with trained "
                            f"weights (those are: {', '.join(with_weights) or 'none'})")
  params = workdir_lib.restore_final(workdir_lib.final_dir(workdir, run_id))["params"]
  state = classifier_state_dict(config, jax.tree.map(np.asarray, params))
  return {"workdir": workdir, "run": run_id,
          "classifier": {"pth": output, "safetensors": save_state_dict(state, output),
                         "keys": len(state), "num_classes": int(state["head.bias"].shape[0])}}


def define_flags() -> None:
  """The command's flags (defined only when run as a command: absl flags are global)."""
  flags.DEFINE_string("workdir", None, "Training workdir to export from.")
  flags.DEFINE_string(
      "output", None, "Pretraining checkpoint to write, e.g. bridle.pth; its .safetensors "
      "copy and the fine-tuning checkpoint are written next to it.")
  flags.DEFINE_string("phase", None, "Finished phase to export (default: the last).")
  flags.DEFINE_string(
      "finetune_output", None, "Fine-tuning ViT checkpoint (default: OUTPUT with "
      "'_finetune' before the extension); its .safetensors copy goes next to it.")
  flags.DEFINE_integer("num_classes", None, "Rows of the new fine-tuning head (default: "
                       "527 for audio, 1000 for images).")
  flags.DEFINE_integer("seed", 0, "Seed of the fine-tuning head's random weight.")
  flags.DEFINE_string("run", None, "Of a fine-tuning workdir: the finished run (fold) to "
                      "export (default: the only one).")
  flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  convert.run_command(lambda: export(f.workdir, f.output, f.phase, f.finetune_output,
                                     f.num_classes, f.seed, f.run))


if __name__ == "__main__":
  define_flags()
  app.run(main)
