"""BRIDLE tokenizer (continuous part) and estimator TE; the quantizer lives in quantizer.py.

Tokenizer params (PyTorch `tokenizer.*` key -> Flax path): patch_embed, cls_token, blocks_{i},
norm as in the encoder; cold_start_encoder (kernel only); quantize_layer.0 / .2 ->
quantize_layer/fc1, quantize_layer/fc2. The estimator is a separate module (the train step runs
tokenizer -> quantizer -> estimator) whose params keep the reference names: estimator_embed,
estimator_blocks_{i}, estimator_norm, estimator_pred. Neither fixed pos table (`pos_embed`,
`estimator_pos_embed`) is a parameter. Outputs are float32.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bridle_jax.models.layers import Block, Dtype, dense, layer_norm, rematted
from bridle_jax.models.pos_embed import audio_pos_embed
from bridle_jax.models.vit import ViTBackbone, backbone_kwargs


class QuantizeHead(nn.Module):
  """Linear D -> D, Tanh, Linear D -> code_dim (the reference `quantize_layer`)."""
  code_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = dense(x.shape[-1], ('embed', 'mlp'), self.dtype, self.param_dtype, 'fc1')(x)
    x = jnp.tanh(x)
    return dense(self.code_dim, ('mlp', 'code'), self.dtype, self.param_dtype, 'fc2',
                 float32_output=True)(x)


class Tokenizer(ViTBackbone):
  """Maps the unmasked input to pre-quantisation codes z (B, L, code_dim) float32.

  cold_start=True: bias-free Linear on patch tokens + pos (no CLS, no blocks).
  cold_start=False: full ViT with CLS, drop CLS, `quantize_layer`.
  `init` creates the parameters of both paths whichever is requested. The last matmul of
  either path keeps its float32 accumulator, so the float32 quantizer sees z unrounded.
  """
  code_dim: int = 256

  def setup(self):
    super().setup()
    self.cold_start_encoder = dense(self.code_dim, ('embed', 'code'), self.dtype,
                                    self.param_dtype, use_bias=False, float32_output=True)
    self.quantize_layer = QuantizeHead(self.code_dim, self.dtype, self.param_dtype)

  def __call__(self, x, cold_start: bool = False):
    tokens = self.embed(x)
    if self.is_initializing():  # create both paths' parameters
      self.quantize_layer(self.transform(tokens)[:, 1:])
      self.cold_start_encoder(tokens)
    if cold_start:
      z = self.cold_start_encoder(tokens)
    else:
      z = self.quantize_layer(self.transform(tokens)[:, 1:])
    return z


class Estimator(nn.Module):
  """TE: z_q (B, L, code_dim) -> prediction of the teacher's patch features (B, L, teacher_width).

  estimator_embed, + fixed pos embed (no CLS row), `depth` blocks, estimator_norm, estimator_pred.
  """
  grid: tuple[int, int]
  teacher_width: int
  width: int = 768
  depth: int = 3
  num_heads: int = 12
  mlp_ratio: float = 4.0
  pos_grid: str = 'reference'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'
  remat: str = 'none'
  residual_stream_dtype: Dtype = jnp.float32
  gelu: str = 'exact'

  @nn.compact
  def __call__(self, z_q):
    x = dense(self.width, ('code', 'embed'), self.dtype, self.param_dtype, 'estimator_embed')(z_q)
    x = x.astype(jnp.float32) + audio_pos_embed(*self.grid, self.width, self.pos_grid,
                                                cls=False)[None]
    x = x.astype(self.residual_stream_dtype)
    block = rematted(Block, self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_ratio, self.dtype, self.param_dtype,
                self.attention_impl, self.gelu, name=f'estimator_blocks_{i}')(x)
    x = layer_norm(self.dtype, self.param_dtype, 'estimator_norm')(x)
    x = dense(self.teacher_width, ('embed', 'vocab'), self.dtype, self.param_dtype,
              'estimator_pred')(x)
    return x.astype(jnp.float32)


def tokenizer_from_config(model_cfg: Any, grid: tuple[int, int]) -> Tokenizer:
  """Tokenizer with the encoder's ViT size and `quantizer.code_dim`."""
  return Tokenizer(**backbone_kwargs(model_cfg, grid), code_dim=model_cfg.quantizer.code_dim)


def estimator_from_config(model_cfg: Any, grid: tuple[int, int],
                          teacher_width: int | None = None) -> Estimator:
  """Estimator with `tokenizer.estimator_depth` blocks of the encoder's width and heads.

  teacher_width defaults to the encoder width (the teacher E has the same ViT size).
  """
  kwargs = backbone_kwargs(model_cfg, grid)
  for field in ('patch_size', 'pos_table_t', 'pos_crop'):  # the estimator's table is its own
    del kwargs[field]
  kwargs['depth'] = model_cfg.tokenizer.estimator_depth
  return Estimator(**kwargs, teacher_width=teacher_width or model_cfg.width)
