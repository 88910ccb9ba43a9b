"""BRIDLE decoder: mask-token un-shuffle, Swin-v2-style local blocks or global ViT blocks.

Follows official_impl.md §2.6-§2.8. The Swin block is the AudioMAE/torchmultimodal one:
post-norm residuals, scaled cosine window attention, a continuous (meta-MLP) relative
position bias and a cyclic shift along time only.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax.models import (attention, layers, masking, platform, pos_embed,
                               window_attention_kernel)

Dtype = Any

SWIN_LN_EPS = 1e-5
META_MLP_HIDDEN = 384
SHIFT_MASK_VALUE = -100.0
WINDOW_IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _swin_layer_norm(dtype, param_dtype, name):
  return nn.LayerNorm(
      epsilon=SWIN_LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=layers.partitioned(nn.initializers.ones, "embed"),
      bias_init=layers.partitioned(nn.initializers.zeros, "embed"))


def relative_coordinates_log(window: Sequence[int]) -> np.ndarray:
  """(n·n, 2) table of sign(Δ)·ln(1+|Δ|) for Δ = pos_a − pos_b; row a·n + b, a = w_f·i + j."""
  i, j = np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")
  coords = np.stack([i.ravel(), j.ravel()], axis=-1)                  # (n, 2)
  delta = (coords[:, None, :] - coords[None, :, :]).reshape(-1, 2)
  return (np.sign(delta) * np.log1p(np.abs(delta))).astype(np.float32)


def shift_attention_mask(grid: Sequence[int], window: Sequence[int],
                         shift: int) -> np.ndarray:
  """(windows, n, n) additive mask: −100 between tokens of different time regions.

  Regions are the time rows [0, T−w), [T−w, T−s), [T−s, T) of the rolled grid (the
  reference shifts time only, so frequency forms a single region).
  """
  grid_t, grid_f = grid
  region = np.zeros((grid_t, grid_f), np.int32)
  region[grid_t - window[0]:grid_t - shift] = 1
  region[grid_t - shift:] = 2
  windows = partition_windows(region[None, :, :, None], window)[0, :, :, 0]
  return np.where(windows[:, :, None] != windows[:, None, :],
                  SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def partition_windows(x, window: Sequence[int]):
  """(B, T, F, C) -> (B, windows, n, C); window index (F/w_f)·(t//w_t) + f//w_f."""
  b, t, f, c = x.shape
  wt, wf = window
  x = x.reshape(b, t // wt, wt, f // wf, wf, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (t // wt) * (f // wf), wt * wf, c)


def merge_windows(x, grid: Sequence[int], window: Sequence[int]):
  """Inverse of `partition_windows`: (B, windows, n, C) -> (B, T, F, C)."""
  b, _, _, c = x.shape
  (t, f), (wt, wf) = grid, window
  x = x.reshape(b, t // wt, f // wf, wt, wf, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, t, f, c)


def shift_windows(x, grid: Sequence[int], window: Sequence[int], shift: int):
  """The windows (B, windows, n, C) of the grid rolled by `shift` rows along time, as
  `partition_windows(jnp.roll(merge_windows(x), shift, axis=1))` but without leaving the
  window layout: rows move within a window or to the next window in time (one pass)."""
  b, _, _, c = x.shape
  (t, f), (wt, wf) = grid, window
  x = x.reshape(b, t // wt, f // wf, wt, wf, c)
  # -shift = windows·wt + row: time row i·wt + r takes the old row (i + windows)·wt + r + row
  windows, row = divmod(-shift, wt)
  x = jnp.concatenate([jnp.roll(x, -windows, axis=1)[:, :, :, row:],
                       jnp.roll(x, -windows - 1, axis=1)[:, :, :, :row]], axis=3)
  return x.reshape(b, (t // wt) * (f // wf), wt * wf, c)


class MetaMlp(nn.Module):
  """Continuous relative position bias: Linear 2→384, ReLU, Dropout, Linear 384→heads."""
  num_heads: int
  dropout: float
  hidden: int = META_MLP_HIDDEN
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coords, deterministic: bool = True):
    h = layers.dense(self.hidden, (None, None), jnp.float32, self.param_dtype, "fc1")(coords)
    h = nn.relu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return layers.dense(self.num_heads, (None, "heads"), jnp.float32, self.param_dtype,
                        "fc2")(h)


def _unit(x):
  """x / max(|x|, 1e-6) along the last axis, in float32 (zero gradient, not NaN, at x = 0)."""
  x = x.astype(jnp.float32)
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared, window_attention_kernel.NORM_EPS ** 2))


def resolve_window_impl(implementation: str, dtype, window_tokens: int, head_dim: int) -> str:
  """The concrete window attention ('xla' or 'pallas') for `dtype` on `platform.backend()`.

  'auto' takes the Pallas kernel on a GPU for 16-bit dtypes and shapes it supports (where
  it was timed: half the time of XLA's form on an H100), XLA everywhere else.
  """
  if implementation != "auto":
    return implementation
  fits = (jnp.dtype(dtype) in attention.HALF_DTYPES
          and window_attention_kernel.unsupported_reason(window_tokens, head_dim) is None)
  return "pallas" if platform.backend() == "gpu" and fits else "xla"


class WindowAttention(nn.Module):
  """Scaled cosine attention inside windows.

  Logits q̂·k̂ / max(τ, 0.01) of unit vectors q̂ = q / max(|q|, 1e-6) (equal to the
  reference's q·k / max(|q||k|, 1e-6) / max(τ, 0.01) unless |q|, |k| or |q||k| falls
  below 1e-6) plus the meta-MLP bias and the shift mask, with scale 1: for 'xla' as one
  fused call with the windows folded into the batch, for 'pallas' as
  `window_attention_kernel` (a GPU kernel; interpreted, slowly, elsewhere); 'auto' picks
  one by `resolve_window_impl`.
  """
  num_heads: int
  window: Sequence[int]
  meta_mlp_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    """x: (B, windows, n, D); mask: NumPy (windows, n, n) additive or None."""
    n, dim = x.shape[2:]
    on_chip = resolve_window_impl(self.attention_impl, self.dtype, n,
                                  dim // self.num_heads) == "pallas"
    qkv = layers.QKVProjection(self.num_heads, self.dtype, self.param_dtype,
                               bias_apart=on_chip, name="qkv")(x)
    tau = self.param("tau", layers.partitioned(nn.initializers.ones, "heads"),
                     (self.num_heads,), self.param_dtype)
    inv_tau = 1.0 / jnp.maximum(tau.astype(jnp.float32), 0.01)
    bias = MetaMlp(self.num_heads, self.meta_mlp_dropout, param_dtype=self.param_dtype,
                   name="meta_mlp")(relative_coordinates_log(self.window), deterministic)
    bias = bias.T.reshape(self.num_heads, n, n)

    if on_chip:  # the kernel adds the projection's bias itself
      qkv, qkv_bias = qkv
      out = window_attention_kernel.window_attention(qkv, inv_tau, bias, mask, qkv_bias=qkv_bias)
    else:
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
      q = (_unit(q) * inv_tau[:, None]).astype(self.dtype)
      k = _unit(k).astype(self.dtype)
      out = self._folded(q, k, v, bias, mask)
    return layers.HeadsProjection(dim, self.dtype, self.param_dtype, name="proj")(out)

  def _folded(self, q, k, v, bias, mask):
    """One attention call over (B·windows) sequences of n tokens."""
    batch, num_windows = q.shape[:2]

    def fold(t):
      return t.reshape(batch * num_windows, *t.shape[2:])

    bias = bias[None]
    if mask is not None:  # a different mask per window: one bias row per (sample, window)
      bias = bias + mask[:, None]
      bias = fold(jnp.broadcast_to(bias, (batch, num_windows, *bias.shape[1:])))
    out = attention.attend(fold(q), fold(k), fold(v), "xla", bias=bias, scale=1.0)
    return out.reshape(q.shape)


class SwinBlock(nn.Module):
  """Post-norm Swin block on a (grid_t, grid_f) token grid; `shift` > 0 rolls time.

  x ← x + LN1(WindowAttn(x)); x ← x + LN2(MLP(x)), both LayerNorms with eps 1e-5.
  """
  num_heads: int
  grid: Sequence[int]
  window: Sequence[int] = (4, 4)
  shift: int = 0
  mlp_ratio: float = 4.0
  meta_mlp_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"
  gelu: str = "exact"

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """x: (B, windows, n, D), the token grid in its unshifted windows (`partition_windows`),
    the layout the decoder keeps through all its Swin blocks."""
    _, num_windows, n, _ = x.shape
    (grid_t, grid_f), (wt, wf) = self.grid, self.window
    if grid_t % wt or grid_f % wf or (num_windows, n) != (grid_t // wt * (grid_f // wf), wt * wf):
      raise ValueError(f"SwinBlock: {num_windows} windows of {n} tokens are not grid "
                       f"{tuple(self.grid)} divisible by window {tuple(self.window)}")
    if not 0 <= self.shift < wt:
      raise ValueError(f"SwinBlock: shift {self.shift} must lie in [0, {wt})")

    h, mask = x, None
    if self.shift:
      h = shift_windows(h, self.grid, self.window, -self.shift)
      mask = shift_attention_mask(self.grid, self.window, self.shift)
    h = WindowAttention(self.num_heads, self.window, self.meta_mlp_dropout, self.dtype,
                        self.param_dtype, self.attention_impl, name="attn")(h, mask, deterministic)
    if self.shift:
      h = shift_windows(h, self.grid, self.window, self.shift)
    x = x + _swin_layer_norm(self.dtype, self.param_dtype, "norm1")(h)
    h = layers.Mlp(self.mlp_ratio, self.dtype, self.param_dtype, self.gelu, name="mlp")(x)
    return x + _swin_layer_norm(self.dtype, self.param_dtype, "norm2")(h)


class Decoder(nn.Module):
  """Predicts token logits for every patch from the encoder's [CLS, kept tokens].

  mode 0: global `layers.Block`s with CLS kept during the blocks (its row is dropped at the
  end); mode 1: `SwinBlock`s, odd blocks shifted by `shift` along time unless `no_shift`;
  modes 2, 3: global blocks with CLS dropped first. The reference hard-codes 16 Swin blocks
  with 16 heads in mode 1 and ignores decoder_depth/num_heads; here `depth`/`num_heads`
  always apply, which reproduces the reference at the audio default (16/16).
  """
  grid: Sequence[int]
  num_tokens: int
  mode: int = 1
  width: int = 512
  depth: int = 16
  num_heads: int = 16
  mlp_ratio: float = 4.0
  window: Sequence[int] = (4, 4)
  shift: int = 2
  no_shift: bool = False
  meta_mlp_dropout: float = 0.0
  pos_grid: str = "reference"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"         # global blocks (modes 0, 2, 3)
  window_attention_impl: str = "auto"  # Swin blocks (mode 1): WINDOW_IMPLEMENTATIONS
  remat: str = "none"                  # see layers.REMAT_POLICIES
  gelu: str = "exact"                  # see layers.GELU_FORMS

  @nn.compact
  def __call__(self, x, ids_restore, deterministic: bool = True):
    """x: (B, 1 + kept, D_enc), CLS first; ids_restore: (B, L) -> float32 (B, L, num_tokens)."""
    if self.mode not in (0, 1, 2, 3):
      raise ValueError(f"decoder mode must be 0, 1, 2 or 3, got {self.mode}")
    grid_t, grid_f = self.grid
    x = layers.dense(self.width, (None, "embed"), self.dtype, self.param_dtype,
                     "decoder_embed")(x)
    mask_token = self.param(
        "mask_token",
        layers.partitioned(nn.initializers.normal(0.02), None, None, "embed"),
        (1, 1, self.width), self.param_dtype)
    x = jnp.concatenate([x[:, :1], masking.restore_tokens(x[:, 1:], ids_restore, mask_token)],
                        axis=1)
    x = x + pos_embed.audio_pos_embed(grid_t, grid_f, self.width, grid=self.pos_grid,
                                      cls=True).astype(x.dtype)
    if self.mode != 0:
      x = x[:, 1:]
    if self.mode == 1:  # the Swin blocks work on windows: partition once, merge at the end
      if grid_t % self.window[0] or grid_f % self.window[1]:
        raise ValueError(f"decoder grid {tuple(self.grid)} is not divisible by window "
                         f"{tuple(self.window)}")
      x = partition_windows(x.reshape(x.shape[0], grid_t, grid_f, self.width), self.window)

    swin_block = layers.rematted(SwinBlock, self.remat, static_argnums=(2,))
    global_block = layers.rematted(layers.Block, self.remat)
    for i in range(self.depth):
      if self.mode == 1:
        shifted = i % 2 == 1 and not self.no_shift
        x = swin_block(self.num_heads, tuple(self.grid), tuple(self.window),
                       self.shift if shifted else 0, self.mlp_ratio, self.meta_mlp_dropout,
                       self.dtype, self.param_dtype, self.window_attention_impl,
                       self.gelu, name=f"decoder_blocks_{i}")(x, deterministic)
      else:
        x = global_block(self.num_heads, self.mlp_ratio, self.dtype, self.param_dtype,
                         self.attention_impl, self.gelu, name=f"decoder_blocks_{i}")(x)
    if self.mode == 1:
      x = merge_windows(x, self.grid, self.window).reshape(x.shape[0], -1, self.width)

    x = layers.layer_norm(self.dtype, self.param_dtype, "decoder_norm")(x)
    x = layers.dense(self.num_tokens, ("embed", "vocab"), self.dtype, self.param_dtype,
                     "decoder_pred", float32_output=True)(x)
    if self.mode == 0:
      x = x[:, 1:]
    return x.astype(jnp.float32)


def decoder_from_config(model_cfg, grid: Sequence[int], num_tokens: int) -> Decoder:
  """Builds the decoder from `config.model` (its `decoder` block, mlp_ratio, pos_grid, dtype)."""
  dec = model_cfg.decoder
  return Decoder(
      grid=tuple(grid), num_tokens=num_tokens, mode=dec.mode, width=dec.width,
      depth=dec.depth, num_heads=dec.num_heads, mlp_ratio=model_cfg.mlp_ratio,
      window=tuple(dec.window), shift=dec.shift, no_shift=dec.no_shift,
      meta_mlp_dropout=dec.meta_mlp_dropout, pos_grid=model_cfg.pos_grid,
      dtype=jnp.dtype(model_cfg.dtype), attention_impl=model_cfg.get("attention_impl", "auto"),
      window_attention_impl=dec.get("attention_impl", "auto"),
      remat=model_cfg.get("remat", "none"), gelu=model_cfg.get("gelu", "exact"))
