"""Downstream classifier: the pretrained ViT encoder with drop path, mean pooling, fc_norm, head.

Mirrors the reference fine-tuning model (`model/vit.py`, global pool): patch embed + fixed pos,
CLS, blocks with stochastic depth (timm's linear rule: block i drops with
drop_path * i / (depth - 1)), mean over the patch tokens (CLS excluded), `fc_norm` (LayerNorm,
eps 1e-6) and a linear `head` (truncated normal std 2e-5, zero bias). The encoder's final `norm`
is not part of it (the reference deletes it). Optional 2-D (or 1-D) patch masking while training
follows the reference's `forward(x, mask_t_prob, mask_f_prob)`.

Param tree: patch_embed, cls_token, blocks_{i} (norm1, attn, norm2, mlp: the names of
`layers.Block`, so pretrained encoder params drop in unchanged), fc_norm, head; with
`learn_pos_embed` also `pos_embed` (1 + L, width), the CLS row (zero) and the fixed table's
rows, which timm's image ViT fine-tunes (the audio reference keeps it frozen).

Input length: a classifier for shorter clips than pretraining (ESC-50: 512 frames, 32 x 8
patches, vs 1024) takes its fixed pos rows from the pretraining table (`model.pos_table_frames`,
set from `init_from`): by default rows 128..383 of the 64 x 8 table, as the reference does
(`model.pos_crop`, pos_embed module doc). Longer clips get a table for their own grid.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridle_jax.data import inputs
from bridle_jax.models import masking
from bridle_jax.models.layers import (Attention, Dtype, Mlp, PatchEmbed, layer_norm, partitioned,
                                      rematted)
from bridle_jax.models.vit import ViTBackbone, backbone_kwargs

HEAD_INIT_STD = 2e-5
# Encoder params the classifier takes over from pretraining (`norm` is left out).
ENCODER_KEYS = ("patch_embed", "cls_token")


class DropPathBlock(nn.Module):
  """`layers.Block` with stochastic depth on both residual branches (same param names).

  While training, each sample's branch output is dropped with probability `drop_path` and
  the kept ones scaled by 1 / (1 - drop_path), as timm's DropPath; rng stream 'dropout'.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'
  gelu: str = 'exact'

  @nn.compact
  def __call__(self, x, train: bool = False, valid_length: int | None = None):
    drop = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), deterministic=not train)
    y = layer_norm(self.dtype, self.param_dtype, 'norm1')(x)
    y = Attention(self.num_heads, self.dtype, self.param_dtype, self.attention_impl,
                  name='attn')(y, valid_length)
    x = x + drop(y)
    y = layer_norm(self.dtype, self.param_dtype, 'norm2')(x)
    return x + drop(Mlp(self.mlp_ratio, self.dtype, self.param_dtype, self.gelu,
                        name='mlp')(y))


class Classifier(ViTBackbone):
  """Logits (B, num_classes) of fbank (B, T, F) or images (B, H, W, C); `train` enables drop
  path and masking.

  Reuses the backbone's fields and `embed`; its own setup has no final `norm`.

  Masking (train only): with `mask_2d`, whole time rows (fraction `mask_t_prob`) and frequency
  columns (`mask_f_prob`) of the patch grid are removed; otherwise a random `mask_t_prob` of
  the patches. Both use the 'mask' rng stream; 0 / 0 turns masking off.
  """
  num_classes: int = 527
  drop_path: float = 0.1
  mask_2d: bool = True
  mask_t_prob: float = 0.0
  mask_f_prob: float = 0.0
  learn_pos_embed: bool = False  # a (1 + L)-row `pos_embed` param from the fixed table (timm's)

  def setup(self):
    self.patch_embed = PatchEmbed(self.width, self.patch_size, self.dtype, self.param_dtype)
    if self.learn_pos_embed:
      fixed = super().pos_table()
      fixed = jnp.concatenate([jnp.zeros_like(fixed[:1]), fixed])  # the CLS row
      self.learned_pos = self.param(
          'pos_embed', partitioned(lambda rng, shape, dtype: fixed.astype(dtype), None, 'embed'),
          fixed.shape, self.param_dtype)
    self.cls_token = self.param(
        'cls_token', partitioned(nn.initializers.normal(0.02), None, None, 'embed'),
        (1, 1, self.width), self.param_dtype)
    rates = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]
    block = rematted(DropPathBlock, self.remat, static_argnums=(2, 3))
    self.blocks = [block(self.num_heads, self.mlp_ratio, rate, self.dtype, self.param_dtype,
                         self.attention_impl, self.gelu) for rate in rates]
    # The probe's part (LayerNorm + Linear on the pooled features) runs in float32.
    self.fc_norm = layer_norm(jnp.float32, self.param_dtype)
    # timm's trunc_normal_(std=2e-5) cuts at +-2 absolute, i.e. +-1e5 standard deviations.
    bound = 2.0 / HEAD_INIT_STD
    self.head = nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=partitioned(
            nn.initializers.truncated_normal(HEAD_INIT_STD, lower=-bound, upper=bound),
            'embed', 'vocab'),
        bias_init=partitioned(nn.initializers.zeros, 'vocab'))

  def pos_table(self):
    return self.learned_pos[1:] if self.learn_pos_embed else super().pos_table()

  def cls_input(self):
    if self.learn_pos_embed:
      return self.cls_token + self.learned_pos[0]
    return super().cls_input()

  def _masked(self, tokens):
    """Kept tokens of a random (2-D or 1-D) mask over the patch grid."""
    batch = tokens.shape[0]
    rng = self.make_rng('mask')
    if self.mask_2d:
      ids_keep, _, _ = masking.random_masking_2d(rng, batch, *self.grid, self.mask_t_prob,
                                                 self.mask_f_prob)
    else:
      ids_keep, _, _ = masking.random_masking(rng, batch, self.num_patches, self.mask_t_prob)
    return masking.gather_tokens(tokens, ids_keep)

  def pooled(self, x, train: bool = False):
    """Mean of the blocks' patch-token outputs (CLS excluded), (B, width) float32.

    Tokens are padded once to the attention's length (`ViTBackbone.with_cls`).
    """
    tokens = self.embed(x)
    if train and (self.mask_t_prob > 0 or self.mask_f_prob > 0):
      tokens = self._masked(tokens)
    h, length = self.with_cls(tokens)
    for block in self.blocks:
      h = block(h, train, length)
    return h[:, 1:length].astype(jnp.float32).mean(axis=1)

  def __call__(self, x, train: bool = False):
    logits = self.head(self.fc_norm(self.pooled(x, train)))
    return logits.astype(jnp.float32)


def input_grid(model_cfg: Any, data_cfg: Any) -> tuple[int, int]:
  """(rows, cols) patches of the data config's input for the model's patch size."""
  return inputs.patch_grid(data_cfg, model_cfg.patch_size)


def classifier_from_config(model_cfg: Any, finetune_cfg: Any, grid: tuple[int, int],
                           num_classes: int) -> Classifier:
  """Classifier sized by `config.model`, with drop path and masking from `config.finetune`."""
  return Classifier(
      **backbone_kwargs(model_cfg, grid), num_classes=num_classes,
      drop_path=finetune_cfg.drop_path, mask_2d=finetune_cfg.mask_2d,
      mask_t_prob=finetune_cfg.mask_t_prob, mask_f_prob=finetune_cfg.mask_f_prob,
      learn_pos_embed=finetune_cfg.get('learn_pos_embed', False))


def with_encoder_params(params: dict, encoder_params: dict) -> dict:
  """Classifier params with patch_embed, cls_token and blocks_* replaced by the encoder's.

  The encoder's `norm` is ignored; fc_norm and head stay as they are. Shapes must match.
  """
  merged = dict(params)
  for key in [k for k in params if k in ENCODER_KEYS or k.startswith('blocks_')]:
    if key not in encoder_params:
      raise ValueError(f'pretrained encoder has no {key!r} (it has {sorted(encoder_params)}); '
                       'does model.depth match the pretrained depth?')
    mine = jax.tree.map(jnp.shape, nn.unbox(params[key]))
    theirs = jax.tree.map(jnp.shape, encoder_params[key])
    if mine != theirs:
      raise ValueError(f'pretrained {key!r} {theirs} does not match the classifier {mine}')
    merged[key] = encoder_params[key]
  return merged
