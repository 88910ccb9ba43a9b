"""Checks a config at start so a bad value fails in one line that names its field."""
import os

import ml_collections

from bridle_jax.data import audio
from bridle_jax.data import inputs
from bridle_jax.data import randaugment
from bridle_jax.models import (attention, decoder, layers, platform, pos_embed, vit,
                               window_attention_kernel)
from bridle_jax.train.sharding import MESH_AXES

DATA_FORMATS = ("json", "folder", "tfds")
QUANTIZER_TYPES = ("rq", "vq")
POS_GRIDS = ("reference", "time_freq")
DTYPES = ("bfloat16", "float32")
RESIDUAL_STREAM_DTYPES = ("float32", "compute")
PHASES = ("encoder", "tokenizer", "joint")
DECODER_MODES = (0, 1, 2, 3)


class ConfigError(ValueError):
  """An invalid config value; the message starts with the field's dotted name."""


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"{field}: {message}")


def _one_of(config, field: str, allowed) -> None:
  value = _get(config, field)
  _require(value in allowed, field, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(config, field: str) -> None:
  value = _get(config, field)
  _require(value > 0, field, f"must be > 0, got {value!r}")


def _get(config, field: str):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def expand_path(path: str, workdir: str) -> str:
  """Expands `{workdir}` and `~` in a configured path."""
  return os.path.expanduser(path.replace("{workdir}", workdir or "."))


def _check_sharding_rules(rules) -> None:
  """Each rule is (logical axis name, mesh axis, tuple of mesh axes, or None)."""
  for rule in rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    _require(ok, "sharding_rules", f"{rule!r} is not a (logical axis, mesh axes) pair")
    targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [t for t in targets if t is not None and t not in MESH_AXES]
    _require(not unknown, "sharding_rules",
             f"{rule!r} names {', '.join(map(repr, unknown))}, not one of the mesh axes "
             f"{', '.join(map(repr, MESH_AXES))}")


def _check_audio_data(config) -> None:
  d, m = config.data, config.model
  for field in ("data.sample_rate", "data.num_mel_bins", "data.target_length", "data.std",
                "data.mixup_alpha"):
    _positive(config, field)
  _require(m.in_chans == 1, "model.in_chans", f"audio fbank has 1 channel, got {m.in_chans}")
  _require(d.target_length % m.patch_size == 0, "data.target_length",
           f"{d.target_length} frames is not divisible by model.patch_size={m.patch_size}")
  _require(d.num_mel_bins % m.patch_size == 0, "data.num_mel_bins",
           f"{d.num_mel_bins} bins is not divisible by model.patch_size={m.patch_size}")
  _require(0.0 <= d.mixup <= 1.0, "data.mixup", f"is a probability, got {d.mixup}")
  _require(0 <= d.freqm <= d.num_mel_bins, "data.freqm", f"must lie in [0, data.num_mel_bins], got {d.freqm}")
  _require(0 <= d.timem <= d.target_length, "data.timem", f"must lie in [0, data.target_length], got {d.timem}")
  _require(d.max_clip_seconds == 0 or d.max_clip_seconds * d.sample_rate >=
           audio.num_samples_for_frames(d.target_length, d.sample_rate),
           "data.max_clip_seconds", f"{d.max_clip_seconds} s is shorter than the "
           f"{d.target_length} frames of data.target_length (25 ms windows every 10 ms)")


def _check_image_data(config) -> None:
  d, m = config.data, config.model
  _positive(config, "data.image_size")
  _require(m.in_chans == 3, "model.in_chans", f"images are RGB (3 channels), got {m.in_chans}")
  _require(d.image_size % m.patch_size == 0, "data.image_size",
           f"{d.image_size} pixels is not divisible by model.patch_size={m.patch_size}")
  for field in ("mean", "std"):
    value = tuple(d[field])
    _require(len(value) == 3, f"data.{field}", f"needs one value per RGB channel, got {value}")
  _require(all(s > 0 for s in d.std), "data.std", f"must be > 0, got {tuple(d.std)}")
  low, high = d.crop_scale
  _require(0 < low <= high <= 1, "data.crop_scale",
           f"must be (low, high) with 0 < low <= high <= 1, got {tuple(d.crop_scale)}")
  low, high = d.crop_ratio
  _require(0 < low <= high, "data.crop_ratio",
           f"must be (low, high) with 0 < low <= high, got {tuple(d.crop_ratio)}")
  if d.get("randaugment"):
    try:
      randaugment.parse_policy(d.randaugment)
    except ValueError as e:
      raise ConfigError(f"data.randaugment: {e}") from None
  _require(0.0 <= d.get("reprob", 0.0) <= 1.0, "data.reprob",
           f"is a probability, got {d.get('reprob')}")
  _require(not m.mask_2d, "model.mask_2d", "time/frequency masking is for audio; use "
           "model.mask_ratio for images")
  _require(m.pos_table_frames == 0, "model.pos_table_frames",
           f"is for audio clips shorter than pretraining; must be 0 for images, got "
           f"{m.pos_table_frames}")


def validate_config(config: ml_collections.ConfigDict, data_paths: bool = True) -> None:
  """Raises ConfigError naming the first invalid field of `config`; with data_paths=False
  (tools that run the step on random input) the data files may be unset."""
  d, m = config.data, config.model
  _one_of(config, "data.format", DATA_FORMATS)
  if data_paths:
    _require(bool(d.manifest), "data.manifest",
             "is empty; set the training manifest (or use the :demo config)")
    if d.format == "json":
      _require(bool(d.label_csv), "data.label_csv",
               "is empty; data.format='json' needs a class_labels_indices.csv")
  if "modality" in d:  # configs saved before images were supported are audio
    _one_of(config, "data.modality", inputs.MODALITIES)
  modality = inputs.modality(d)
  missing = [f"data.{name}" for name in inputs.REQUIRED_FIELDS[modality] if name not in d]
  _require(not missing, "data.modality", f"{modality!r} needs {', '.join(missing)}; start from "
           f"configs/{modality}.py")
  if inputs.modality(d) == "image":
    _check_image_data(config)
  else:
    _check_audio_data(config)
  for field in ("model.patch_size", "model.width", "model.depth", "model.num_heads",
                "model.in_chans"):
    _positive(config, field)
  if m.size in vit.VIT_SIZES:
    shape = (m.width, m.depth, m.num_heads)
    _require(shape == vit.VIT_SIZES[m.size], "model.size",
             f"{m.size!r} is width, depth, heads {vit.VIT_SIZES[m.size]}, but model.width, "
             f"model.depth, model.num_heads are {shape}; set those three too (or name another "
             "size for another shape)")
  _require(d.num_workers >= -1, "data.num_workers",
           f"must be >= 0, or -1 for one per CPU core, got {d.num_workers}")
  _require(d.prefetch >= 1, "data.prefetch", f"must be >= 1, got {d.prefetch}")

  _one_of(config, "model.dtype", DTYPES)
  _one_of(config, "model.pos_grid", POS_GRIDS)
  _one_of(config, "model.pos_crop", pos_embed.CROPS)
  _require(m.pos_table_frames >= 0 and m.pos_table_frames % m.patch_size == 0,
           "model.pos_table_frames", f"must be 0 or a multiple of model.patch_size="
           f"{m.patch_size}, got {m.pos_table_frames}")
  _one_of(config, "model.attention_impl", attention.IMPLEMENTATIONS)
  _one_of(config, "model.remat", tuple(layers.REMAT_POLICIES))
  _one_of(config, "model.residual_stream_dtype", RESIDUAL_STREAM_DTYPES)
  _one_of(config, "model.gelu", tuple(layers.GELU_FORMS))
  if "gpu_matmuls" in m:
    _one_of(config, "model.gpu_matmuls", platform.GPU_MATMULS)
  _require(m.attention_impl != "cudnn" or m.dtype == "bfloat16", "model.attention_impl",
           f"'cudnn' needs model.dtype='bfloat16', got {m.dtype!r}")
  _require(m.width % m.num_heads == 0, "model.width",
           f"{m.width} is not divisible by model.num_heads={m.num_heads}")
  _require(0.0 <= m.mask_ratio < 1.0, "model.mask_ratio", f"must lie in [0, 1), got {m.mask_ratio}")
  for field in ("model.mask_t_prob", "model.mask_f_prob"):
    _require(0.0 <= _get(config, field) < 1.0, field, f"must lie in [0, 1), got {_get(config, field)}")

  dec = m.decoder
  _one_of(config, "model.decoder.mode", DECODER_MODES)
  _one_of(config, "model.decoder.attention_impl", decoder.WINDOW_IMPLEMENTATIONS)
  _require(dec.width % dec.num_heads == 0, "model.decoder.width",
           f"{dec.width} is not divisible by model.decoder.num_heads={dec.num_heads}")
  if dec.mode == 1:
    grid = inputs.patch_grid(d, m.patch_size)
    for axis, (size, window) in enumerate(zip(grid, dec.window)):
      _require(window > 0 and size % window == 0, "model.decoder.window",
               f"{tuple(dec.window)} does not tile the {grid[0]}x{grid[1]} patch grid (axis {axis})")
    _require(0 <= dec.shift < dec.window[0], "model.decoder.shift",
             f"must lie in [0, window[0]={dec.window[0]}), got {dec.shift}")
    window_tokens = dec.window[0] * dec.window[1]
    reason = window_attention_kernel.unsupported_reason(window_tokens, dec.width // dec.num_heads)
    _require(dec.attention_impl != "pallas" or reason is None, "model.decoder.attention_impl",
             f"'pallas': {reason} (model.decoder.window, width / num_heads)")

  q = m.quantizer
  _one_of(config, "model.quantizer.type", QUANTIZER_TYPES)
  for field in ("num_codebooks", "codebook_size", "code_dim", "kmeans_iters", "soft_code"):
    _positive(config, f"model.quantizer.{field}")
  _require(0.0 < q.decay < 1.0, "model.quantizer.decay", f"must lie in (0, 1), got {q.decay}")
  _require(q.soft_code <= q.codebook_size, "model.quantizer.soft_code",
           f"{q.soft_code} exceeds model.quantizer.codebook_size={q.codebook_size}")
  if q.type == "vq":
    _require(q.num_codebooks == 1, "model.quantizer.num_codebooks",
             f"type 'vq' is a single codebook, got {q.num_codebooks}")

  _require(len(config.rounds) > 0, "rounds", "lists no phase")
  for i, phase in enumerate(config.rounds):
    _require(phase in PHASES, f"rounds[{i}]", f"{phase!r} is not one of {', '.join(map(repr, PHASES))}")
  for name in sorted(set(config.rounds)):
    for field in ("batch_size", "epochs"):
      _positive(config, f"{name}_phase.{field}")
    _require(0 <= _get(config, f"{name}_phase.warmup_epochs") <= _get(config, f"{name}_phase.epochs"),
             f"{name}_phase.warmup_epochs", "must lie in [0, epochs]")
    phase = config[f"{name}_phase"]
    _positive(config, f"{name}_phase.lr")
    _positive(config, f"{name}_phase.grad_accum")
    _require(phase.batch_size % phase.grad_accum == 0, f"{name}_phase.grad_accum",
             f"{phase.grad_accum} does not divide {name}_phase.batch_size={phase.batch_size}")
    _require(phase.steps >= 0, f"{name}_phase.steps", f"must be >= 0, got {phase.steps}")
    _require(phase.clip_grad >= 0, f"{name}_phase.clip_grad", f"must be >= 0, got {phase.clip_grad}")
    restart_every = phase.get("restart_unused_every", 0)
    _require(restart_every >= 0, f"{name}_phase.restart_unused_every",
             f"must be >= 0, got {restart_every}")
    _require(restart_every == 0 or q.restart_unused, f"{name}_phase.restart_unused_every",
             "restarts need model.quantizer.restart_unused=True")
  if "joint" in config.rounds:
    _positive(config, "joint_phase.tokenizer_every")
  if config.encoder_phase.get("reuse_codes", False):
    _require(inputs.modality(d) == "audio", "encoder_phase.reuse_codes",
             "needs unaugmented input, and image pretraining crops at random")
    augmented = [f"data.{name}" for name in ("roll_mag_aug", "mixup", "freqm", "timem") if d[name]]
    _require(not augmented, "encoder_phase.reuse_codes",
             f"needs unaugmented input, but {', '.join(augmented)} augment it; turn them off "
             "or reuse_codes off")
  for axis in MESH_AXES:
    size = config.mesh[axis]
    _require(size == -1 or size > 0, f"mesh.{axis}", f"must be -1 or > 0, got {size}")
  _check_sharding_rules(config.sharding_rules)
  for field in ("checkpoint_every", "keep_checkpoints", "log_every", "usage_every"):
    _positive(config, field)
  _require(config.max_nonfinite_updates >= 0, "max_nonfinite_updates",
           f"must be >= 0, got {config.max_nonfinite_updates}")
