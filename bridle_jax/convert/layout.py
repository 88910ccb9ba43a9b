"""The official BRIDLE PyTorch state-dict layout and its map to bridle_jax params.

One ordered list of entries describes every official key (official_impl.md Appendix A for the
pretraining model, Appendix B for the fine-tuning ViT). Both converter directions read it:
`to_torch` maps each parameter with its entry's `Transform.to_torch`, `from_torch` with
`Transform.from_torch`.

Entries:
  ParamEntry     a parameter of ours under `path` ('encoder' | 'decoder' | 'tokenizer' |
                 'estimator', ...), with an invertible `Transform`;
  PosEntry       a frozen sin-cos table (a constant here, a stored Parameter there);
  CodebookEntry  a field of `quantizer.codebooks.<stage>` made from our `CodebookState`.

Layout rules (PyTorch <- Flax):
  Linear weight (out, in)         <- kernel (in, out), transposed;
  fused qkv weight (3D, D)        <- kernel (D, 3, heads, head_dim): rows [q | k | v], each
                                     head-major, i.e. kernel.reshape(D, 3D).T; bias (3D,) flat;
  attention proj weight (D, D)    <- kernel (heads, head_dim, D).reshape(D, D).T (input
                                     columns head-major);
  Conv2d weight (out, in, kh, kw) <- kernel (kh, kw, in, out), kh along time;
  LayerNorm weight / bias         <- scale / bias;
  nn.Sequential indices: quantize_layer.{0,2} <- quantize_layer/fc{1,2}, Swin
  mlp.model.{0,2} <- mlp/fc{1,2}, meta_mlp.model.{0,3} <- meta_mlp/fc{1,2}.
"""
import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from bridle_jax.data import inputs
from bridle_jax.models.pos_embed import audio_pos_embed


@dataclasses.dataclass(frozen=True)
class Transform:
  """An invertible array map. to_torch(a) -> w; from_torch(w, flax_shape) -> a."""
  to_torch: Callable[[np.ndarray], np.ndarray]
  from_torch: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]

  def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax array of `flax_shape`."""
    abstract = jax.ShapeDtypeStruct(flax_shape, np.float32)
    return tuple(jax.eval_shape(self.to_torch, abstract).shape)


def _matrix(in_axes: int) -> Transform:
  """Kernel with `in_axes` leading input axes and the output axes after them -> (out, in)."""
  return Transform(lambda a: a.reshape(math.prod(a.shape[:in_axes]), -1).T,
                   lambda w, shape: w.T.reshape(shape))


IDENTITY = Transform(lambda a: a, lambda w, shape: w)
FLAT = Transform(lambda a: a.reshape(-1), lambda w, shape: w.reshape(shape))
LINEAR = _matrix(1)      # Dense kernel (in, out) and fused qkv kernel (D, 3, heads, head_dim)
HEADS_PROJ = _matrix(2)  # output projection kernel (heads, head_dim, D)
CONV = Transform(lambda a: a.transpose(3, 2, 0, 1), lambda w, shape: w.transpose(2, 3, 1, 0))


@dataclasses.dataclass(frozen=True)
class ParamEntry:
  key: str
  path: tuple[str, ...]
  transform: Transform


@dataclasses.dataclass(frozen=True)
class PosEntry:
  """A fixed (1, [1 +] grid_t * grid_f, width) sin-cos table."""
  key: str
  grid: tuple[int, int]
  width: int
  pos_grid: str
  cls: bool
  table_t: int = 0  # rows from a longer grid's table (pos_embed.audio_pos_embed)
  crop: str = "reference"

  def table(self) -> np.ndarray:
    return audio_pos_embed(*self.grid, self.width, self.pos_grid, cls=self.cls,
                           table_t=self.table_t, crop=self.crop)[None]


@dataclasses.dataclass(frozen=True)
class CodebookEntry:
  """Field of official codebook `stage`: weight (K + 1, D) with zero padding row K,
  cluster_size_ema (K,), embed_ema (K, D) = the code rows, initted (1,)."""
  key: str
  stage: int
  field: str


Entry = ParamEntry | PosEntry | CodebookEntry


def _linear(key: str, path: tuple[str, ...], kernel: Transform = LINEAR,
            bias: bool = True) -> list[Entry]:
  entries = [ParamEntry(f"{key}.weight", path + ("kernel",), kernel)]
  if bias:
    entries.append(ParamEntry(f"{key}.bias", path + ("bias",), FLAT))
  return entries


def _layer_norm(key: str, path: tuple[str, ...]) -> list[Entry]:
  return [ParamEntry(f"{key}.weight", path + ("scale",), IDENTITY),
          ParamEntry(f"{key}.bias", path + ("bias",), IDENTITY)]


def _block(key: str, path: tuple[str, ...]) -> list[Entry]:
  """timm pre-norm ViT block."""
  return (_layer_norm(f"{key}.norm1", path + ("norm1",))
          + _linear(f"{key}.attn.qkv", path + ("attn", "qkv"))
          + _linear(f"{key}.attn.proj", path + ("attn", "proj"), HEADS_PROJ)
          + _layer_norm(f"{key}.norm2", path + ("norm2",))
          + _linear(f"{key}.mlp.fc1", path + ("mlp", "fc1"))
          + _linear(f"{key}.mlp.fc2", path + ("mlp", "fc2")))


def _swin_block(key: str, path: tuple[str, ...]) -> list[Entry]:
  """Post-norm Swin decoder block (official_impl.md §2.7)."""
  attn = path + ("attn",)
  return ([ParamEntry(f"{key}.attn.tau", attn + ("tau",), IDENTITY)]
          + _linear(f"{key}.attn.qkv", attn + ("qkv",))
          + _linear(f"{key}.attn.proj", attn + ("proj",), HEADS_PROJ)
          + _linear(f"{key}.attn.meta_mlp.model.0", attn + ("meta_mlp", "fc1"))
          + _linear(f"{key}.attn.meta_mlp.model.3", attn + ("meta_mlp", "fc2"))
          + _layer_norm(f"{key}.norm1", path + ("norm1",))
          + _linear(f"{key}.mlp.model.0", path + ("mlp", "fc1"))
          + _linear(f"{key}.mlp.model.2", path + ("mlp", "fc2"))
          + _layer_norm(f"{key}.norm2", path + ("norm2",)))


def grid_of(config) -> tuple[int, int]:
  """(rows, cols) patch grid of the config's input: (time, freq) for audio."""
  return inputs.patch_grid(config.data, config.model.patch_size)


def _vit(prefix: str, module: str, config) -> dict[str, list[Entry]]:
  """Parts of a ViT trunk (encoder or tokenizer), by official attribute."""
  m = config.model
  return {
      "cls_token": [ParamEntry(f"{prefix}cls_token", (module, "cls_token"), IDENTITY)],
      "pos_embed": [PosEntry(f"{prefix}pos_embed", grid_of(config), m.width, m.pos_grid, True,
                             m.get("pos_table_frames", 0) // m.patch_size,
                             m.get("pos_crop", "reference"))],
      "patch_embed": _linear(f"{prefix}patch_embed.proj", (module, "patch_embed", "proj"), CONV),
      "blocks": [e for i in range(m.depth)
                 for e in _block(f"{prefix}blocks.{i}", (module, f"blocks_{i}"))],
      "norm": _layer_norm(f"{prefix}norm", (module, "norm")),
  }


def check_supported(config) -> None:
  """Raises ValueError for a quantizer without an official layout here."""
  if config.model.quantizer.type != "rq":
    raise ValueError(f"model.quantizer.type={config.model.quantizer.type!r}: only 'rq' "
                     "(the official RQBottleneck) has a layout in this converter")


def pretrain_layout(config) -> list[Entry]:
  """Entries of the official `BRIDLE` state dict, in its `state_dict()` order.

  `quantizer.codebooks.<s>.initted` exists only when model.quantizer.kmeans_init is set,
  as in the official constructor (644 keys for audio ViT-B, 640 without).
  """
  check_supported(config)
  m, q, dec = config.model, config.model.quantizer, config.model.decoder
  grid = grid_of(config)
  e, d, t = "encoder_decoder.", "decoder", "tokenizer."
  encoder = _vit(e, "encoder", config)
  block = _swin_block if dec.mode == 1 else _block
  entries = (
      encoder["cls_token"] + encoder["pos_embed"]
      + [ParamEntry(f"{e}mask_token", (d, "mask_token"), IDENTITY),
         PosEntry(f"{e}decoder_pos_embed", grid, dec.width, m.pos_grid, True)]
      + encoder["patch_embed"] + encoder["blocks"] + encoder["norm"]
      + _linear(f"{e}decoder_embed", (d, "decoder_embed"))
      + [x for i in range(dec.depth)
         for x in block(f"{e}decoder_blocks.{i}", (d, f"decoder_blocks_{i}"))]
      + _layer_norm(f"{e}decoder_norm", (d, "decoder_norm"))
      + _linear(f"{e}decoder_pred", (d, "decoder_pred")))

  tokenizer = _vit(t, "tokenizer", config)
  fields = ("weight", "cluster_size_ema", "embed_ema") + (("initted",) if q.kmeans_init else ())
  entries += (
      tokenizer["cls_token"] + tokenizer["pos_embed"]
      + [PosEntry(f"{t}estimator_pos_embed", grid, m.width, m.pos_grid, False)]
      + tokenizer["patch_embed"] + tokenizer["blocks"] + tokenizer["norm"]
      + _linear(f"{t}cold_start_encoder", ("tokenizer", "cold_start_encoder"), bias=False)
      + _linear(f"{t}quantize_layer.0", ("tokenizer", "quantize_layer", "fc1"))
      + _linear(f"{t}quantize_layer.2", ("tokenizer", "quantize_layer", "fc2"))
      + [CodebookEntry(f"{t}quantizer.codebooks.{s}.{field}", s, field)
         for s in range(q.num_codebooks) for field in fields]
      + _linear(f"{t}estimator_embed", ("estimator", "estimator_embed"))
      + [x for i in range(m.tokenizer.estimator_depth)
         for x in _block(f"{t}estimator_blocks.{i}", ("estimator", f"estimator_blocks_{i}"))]
      + _layer_norm(f"{t}estimator_norm", ("estimator", "estimator_norm"))
      + _linear(f"{t}estimator_pred", ("estimator", "estimator_pred")))
  return entries


def finetune_backbone_layout(config) -> list[Entry]:
  """Entries of the official fine-tuning ViT taken from our encoder, in `state_dict()` order.

  The fine-tuning ViT has no final `norm` (it pools, then applies the new `fc_norm`); its
  new `fc_norm.*` and `head.*` keys follow these and are written by `to_torch`.
  """
  encoder = _vit("", "encoder", config)
  return encoder["cls_token"] + encoder["pos_embed"] + encoder["patch_embed"] + encoder["blocks"]


def get_path(tree, path: tuple[str, ...]):
  for part in path:
    tree = tree[part]
  return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value
