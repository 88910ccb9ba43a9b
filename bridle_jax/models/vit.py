"""ViT encoder E of BRIDLE (MAE-style: patch embed + fixed sin-cos pos, masking, CLS, blocks, norm).

Param tree (PyTorch key -> Flax path): patch_embed.proj -> patch_embed/proj, cls_token,
blocks.{i} -> blocks_{i}, norm. The fixed `pos_embed` is not a parameter: it is
`pos_embed.audio_pos_embed(grid_t, grid_f, width, pos_grid, table_t=pos_table_t)`, recomputed
on every trace.
Input: audio fbank (B, T, F) or (B, T, F, C), images (B, H, W, C); grid = (H/p, W/p). The token
residual stream is in `residual_stream_dtype` (float32, as under the reference's autocast, or
the compute dtype); matmuls run in `dtype`; outputs are in `dtype`.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bridle_jax.models import attention, masking
from bridle_jax.models.layers import (Block, Dtype, PatchEmbed, broadcast_param, layer_norm,
                                      partitioned, rematted)
from bridle_jax.models.pos_embed import audio_pos_embed

# Named encoder sizes (`model.size`): (width, depth, heads).
VIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}


class ViTBackbone(nn.Module):
  """Shared trunk of the encoder and the tokenizer: `embed` then `transform`."""
  grid: tuple[int, int]  # (grid_t, grid_f) patches: (time, freq) for audio, (rows, cols) images
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 16
  pos_grid: str = 'reference'  # see pos_embed.audio_pos_embed; use 'time_freq' for images
  pos_table_t: int = 0  # take the pos rows from a longer grid's table (pos_embed module doc)
  pos_crop: str = 'reference'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat: str = 'none'  # see layers.REMAT_POLICIES
  residual_stream_dtype: Dtype = jnp.float32  # the tokens between blocks and their gradient
  gelu: str = 'exact'  # see layers.GELU_FORMS

  def setup(self):
    self.patch_embed = PatchEmbed(self.width, self.patch_size, self.dtype, self.param_dtype)
    self.cls_token = self.param(
        'cls_token', partitioned(nn.initializers.normal(0.02), None, None, 'embed'),
        (1, 1, self.width), self.param_dtype)
    block = rematted(Block, self.remat, static_argnums=(2,))
    self.blocks = [block(self.num_heads, self.mlp_ratio, self.dtype, self.param_dtype,
                         self.attention_impl, self.gelu) for _ in range(self.depth)]
    self.norm = layer_norm(self.dtype, self.param_dtype)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def embed(self, x):
    """Image/fbank -> patch tokens + fixed pos embed, (B, L, width) in the residual stream dtype."""
    tokens = self.patch_embed(x)
    if tokens.shape[1] != self.num_patches:
      raise ValueError(f'input {x.shape} gives {tokens.shape[1]} patches, grid {self.grid} '
                       f'expects {self.num_patches}')
    return (tokens.astype(jnp.float32) + self.pos_table()[None]).astype(
        self.residual_stream_dtype)

  def pos_table(self):
    """(L, width) position embedding of the patch tokens: the fixed sin-cos table."""
    return jnp.asarray(audio_pos_embed(*self.grid, self.width, self.pos_grid, cls=False,
                                       table_t=self.pos_table_t, crop=self.pos_crop))

  def cls_input(self):
    """(1, 1, width) CLS token as it enters the blocks: the fixed table's CLS row is zero."""
    return self.cls_token

  def transform(self, tokens):
    """Prepends CLS (its pos row is zero), runs the blocks and the final norm."""
    x, length = self.with_cls(tokens)
    for block in self.blocks:
      x = block(x, length)
    return self.norm(x[:, :length])

  def with_cls(self, tokens):
    """(CLS + tokens, their count): padded with zero tokens to the length attention runs on
    (cuDNN: an even one), once for all blocks, which mask the padding as keys."""
    cls = broadcast_param(self.cls_input(), (tokens.shape[0], 1, self.width), tokens.dtype)
    x = jnp.concatenate([cls, tokens], axis=1)
    length = x.shape[1]
    padded = attention.padded_length(length, self.attention_impl, self.dtype,
                                     self.width // self.num_heads)
    if padded > length:
      x = jnp.pad(x, [(0, 0), (0, padded - length), (0, 0)])
    return x, length


class Encoder(ViTBackbone):
  """Encoder E: returns (features (B, 1 + keep, width), mask (B, L), ids_restore (B, L)).

  With `apply_mask` (and mask_2d or mask_ratio > 0) tokens are masked after the pos embed with
  rngs from the 'mask' stream; otherwise all L tokens are kept, mask is zeros and ids_restore
  the identity.
  """
  mask_ratio: float = 0.8
  mask_2d: bool = False
  mask_t_prob: float = 0.7
  mask_f_prob: float = 0.3

  def __call__(self, x, apply_mask: bool = False):
    tokens = self.embed(x)
    batch = tokens.shape[0]
    if apply_mask and (self.mask_2d or self.mask_ratio > 0):
      rng = self.make_rng('mask')
      if self.mask_2d:
        ids_keep, mask, ids_restore = masking.random_masking_2d(
            rng, batch, *self.grid, self.mask_t_prob, self.mask_f_prob)
      else:
        ids_keep, mask, ids_restore = masking.random_masking(
            rng, batch, self.num_patches, self.mask_ratio)
      tokens = masking.gather_tokens(tokens, ids_keep)
    else:
      mask = jnp.zeros((batch, self.num_patches), jnp.float32)
      ids_restore = jnp.broadcast_to(jnp.arange(self.num_patches, dtype=jnp.int32), mask.shape)
    return self.transform(tokens), mask, ids_restore


def backbone_kwargs(model_cfg: Any, grid: tuple[int, int]) -> dict[str, Any]:
  """ViTBackbone fields from a `config.model` ConfigDict."""
  return dict(
      grid=tuple(grid), width=model_cfg.width, depth=model_cfg.depth,
      num_heads=model_cfg.num_heads, mlp_ratio=model_cfg.mlp_ratio,
      patch_size=model_cfg.patch_size, pos_grid=model_cfg.pos_grid,
      pos_table_t=model_cfg.get('pos_table_frames', 0) // model_cfg.patch_size,
      pos_crop=model_cfg.get('pos_crop', 'reference'),
      dtype=jnp.dtype(model_cfg.dtype), attention_impl=model_cfg.get('attention_impl', 'auto'),
      remat=model_cfg.get('remat', 'none'), residual_stream_dtype=residual_stream_dtype(model_cfg),
      gelu=model_cfg.get('gelu', 'exact'))


def residual_stream_dtype(model_cfg: Any):
  """`model.residual_stream_dtype`: 'float32', or 'compute' for `model.dtype`."""
  if model_cfg.get('residual_stream_dtype', 'float32') == 'compute':
    return jnp.dtype(model_cfg.dtype)
  return jnp.dtype(jnp.float32)


def encoder_from_config(model_cfg: Any, grid: tuple[int, int]) -> Encoder:
  """Encoder for grid = (target_length // patch, num_mel_bins // patch) (or image rows, cols)."""
  return Encoder(
      **backbone_kwargs(model_cfg, grid), mask_ratio=model_cfg.mask_ratio,
      mask_2d=model_cfg.mask_2d, mask_t_prob=model_cfg.mask_t_prob,
      mask_f_prob=model_cfg.mask_f_prob)
