"""What a training run leaves in its workdir, and how later tools read it back.

  config.json                    the run's config (paths expanded)
  progress.json                  finished phases, in order
  checkpoints/<phase>/<step>     full train state + data position (resume)
  checkpoints/<phase>_final/     params + codebooks at the phase end (hand-off, exports)
"""
import json
import os

import flax.linen as nn
import jax
import ml_collections

from bridle_jax import files
from bridle_jax.models import quantizer
from bridle_jax.train import checkpoint
from bridle_jax.train import state as state_lib

CONFIG_FILE = "config.json"
# Fields that fix the shapes of what a checkpoint holds; a resumed or `init_from` run
# must agree with the run that wrote it on these.
SHAPE_FIELDS = ("model", "data.modality", "data.target_length", "data.num_mel_bins",
                "data.image_size")
# Fields of `model` that change how the step computes, not what it holds: free to change,
# and reset to these portable values when a finished run is loaded for inference.
SPEED_DEFAULTS = {"model.attention_impl": "auto", "model.remat": "none",
                  "model.decoder.attention_impl": "auto",
                  "model.residual_stream_dtype": "float32", "model.gelu": "exact",
                  "model.gpu_matmuls": "auto"}
# Data fields that a resumed run may change although its started phases used them: how
# the data is read and where it lies (a moved corpus), not what it holds.
RESUME_FREE = ("data.num_workers", "data.prefetch", "data.manifest", "data.label_csv",
               "data.eval_manifest", "data.demo_dir", "data.format")
FINETUNE_FIELDS = ("mode", "seed", "init_from", "init_phase", "model", "finetune", "data")
# Fields added after runs were saved without them, with the value that matches how those
# runs behaved.
ADDED_DEFAULTS = {"model.pos_table_frames": 0, "model.pos_crop": "reference",
                  "data.modality": "audio"}


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_atomic(os.path.join(workdir, CONFIG_FILE),
                       config.to_json_best_effort(indent=1).encode("utf-8"))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; is {workdir} a bridle_jax training workdir?")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def _flatten(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def check_compatible(config: ml_collections.ConfigDict, workdir: str,
                     fields=SHAPE_FIELDS) -> None:
  """Raises ValueError naming the first of `fields` where `workdir`'s saved config differs."""
  saved, current = _flat_configs(config, workdir)
  # The modality first: another modality differs in every data field.
  for key in sorted(set(saved) | set(current), key=lambda k: (k != "data.modality", k)):
    if key in SPEED_DEFAULTS or not _under(key, fields):
      continue
    saved_value = saved.get(key, ADDED_DEFAULTS.get(key))
    if saved_value != current.get(key):
      raise ValueError(f"{workdir} holds a run with a different config: {key} is "
                       f"{saved_value!r} there and {current.get(key)!r} now; use another "
                       f"--workdir (or --config.init_from to start from that run)")


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError naming the first field a started phase of `workdir` (finished, or
  with a checkpoint to resume) trained with and `config` changes.

  Such a phase depends on the seed, `init_from` (which decides the cold start),
  `encoder_from_scratch`, the rounds up to it, its `<kind>_phase` block (but `grad_accum`
  and `reuse_codes`, which change how, not what, it computes) and the data settings (but
  `RESUME_FREE`); `check_compatible` covers the model. Blocks of kinds that no started
  phase has, the mesh, logging and checkpoint cadence may change.
  """
  saved, current = _flat_configs(config, workdir)
  finished = checkpoint.read_progress(workdir).get("completed", [])
  for index, kind in enumerate(saved["rounds"]):
    phase_id = f"p{index + 1}_{kind}"
    if phase_id not in finished and not has_phase_checkpoint(workdir, phase_id):
      continue
    if list(current["rounds"][:index + 1]) != list(saved["rounds"][:index + 1]):
      _refuse_resume(workdir, phase_id, "rounds", saved["rounds"], current["rounds"])
    _check_unchanged(saved, current,
                     ("seed", "init_from", "encoder_from_scratch", f"{kind}_phase", "data"),
                     RESUME_FREE + (f"{kind}_phase.grad_accum", f"{kind}_phase.reuse_codes"),
                     workdir, phase_id)


def check_finetune_resumable(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ValueError naming the first field that `config` changes from the fine-tuning
  or probe runs `workdir` holds (finished, or with a checkpoint): the mode, the seed, the
  pretrained run (`init_from`, `init_phase`), the model, the `finetune` block and the data
  settings (but `RESUME_FREE`) stay as they were; the speed settings, mesh and logging
  may change."""
  checkpoints = os.path.join(workdir, "checkpoints")
  started = (checkpoint.read_progress(workdir).get("runs")
             or (os.path.isdir(checkpoints) and os.listdir(checkpoints)))
  if not started:
    return
  saved, current = _flat_configs(config, workdir)
  _check_unchanged(saved, current, FINETUNE_FIELDS, RESUME_FREE + tuple(SPEED_DEFAULTS),
                   workdir, "its fine-tuning runs")


def _flat_configs(config: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict]:
  """(`workdir`'s saved config, `config`) as flat {dotted key: value} dicts."""
  return (_flatten(json.loads(load_config(workdir).to_json_best_effort())),
          _flatten(json.loads(config.to_json_best_effort())))


def _under(key: str, fields) -> bool:
  """Whether the dotted `key` is one of `fields` or lies inside one."""
  return any(key == field or key.startswith(field + ".") for field in fields)


def _check_unchanged(saved: dict, current: dict, fields, exempt, workdir: str, what: str):
  for key in sorted(saved):
    if (_under(key, fields) and key not in exempt and key in current
        and current[key] != saved[key]):
      _refuse_resume(workdir, what, key, saved[key], current[key])


def _refuse_resume(workdir: str, what: str, key: str, saved, current):
  raise ValueError(f"{workdir}: {what} started with {key} = {saved!r}, and {key} is "
                   f"{current!r} now; resume with the settings it started with, or use "
                   "another --workdir")


def finished_phases(workdir: str) -> list[str]:
  return checkpoint.read_progress(workdir).get("completed", [])


def init_from_phases(workdir: str, config) -> list[str]:
  """The finished phases of `config.init_from` that the run in `workdir` starts from: those
  recorded in its progress.json when it first started (a resume ignores phases init_from
  finished since, which would change a started phase's targets), else init_from's now."""
  recorded = checkpoint.read_progress(workdir).get("init_from_phases")
  if recorded is not None:
    return list(recorded)
  return finished_phases(config.init_from) if config.get("init_from") else []


def final_dir(workdir: str, phase_id: str) -> str:
  return os.path.join(workdir, "checkpoints", f"{phase_id}_final")


def has_phase_checkpoint(workdir: str, phase_id: str) -> bool:
  """Whether a phase has a committed mid-phase checkpoint to resume from.

  Orbax commits a step by renaming its temporary directory to the bare step number.
  """
  directory = os.path.join(workdir, "checkpoints", phase_id)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def abstract_pretrained(models: state_lib.Models) -> dict:
  """Shapes of {'params', 'codebooks'} as annotated (boxed) abstract arrays."""
  def fresh(rng):
    params_rng, codebook_rng = jax.random.split(rng)
    return {"params": state_lib.init_params(models, params_rng),
            "codebooks": quantizer.init(models.quantizer, codebook_rng)}
  return jax.eval_shape(fresh, jax.random.PRNGKey(0))


def restore_final(directory: str, abstract: dict | None = None) -> dict:
  """Restores {'params', 'codebooks'} from a phase's final checkpoint into `abstract`'s
  shardings (jax.ShapeDtypeStruct leaves with .sharding); without `abstract`, the tree as
  saved on this process's first device (for readers that build no model: exports)."""
  ckpt = checkpoint.PhaseCheckpointer(directory, save_every=1, keep=1, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory}: no finished phase checkpoint")
    if abstract is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              ckpt.saved_shapes(step))
    tree, _ = ckpt.restore(abstract, step, with_data=False)
  finally:
    ckpt.close()
  return tree


def load_pretrained(workdir: str, phase_id: str | None = None):
  """(config, models, {"params", "codebooks"}) of a finished phase, on this process's first device.

  phase_id defaults to the last finished phase. The run's speed settings are replaced by
  SPEED_DEFAULTS, so a run trained with cuDNN attention or remat loads anywhere.
  """
  config = load_config(workdir)
  done = finished_phases(workdir)
  if phase_id is None:
    if not done:
      raise FileNotFoundError(f"{workdir}: no finished phase (progress.json lists none)")
    phase_id = done[-1]
  elif phase_id not in done:
    raise FileNotFoundError(f"{workdir}: phase {phase_id!r} is not finished (finished: {done})")
  config.update_from_flattened_dict(SPEED_DEFAULTS)  # e.g. a cuDNN run read back on a CPU
  models = state_lib.build_models(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # each process its own
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          nn.unbox(abstract_pretrained(models)))
  return config, models, restore_final(final_dir(workdir, phase_id), abstract)
