"""Shared ViT building blocks (timm layout) with logical axis names on every parameter.

Logical axes: 'embed' model width, 'mlp' MLP hidden, 'heads' attention heads, 'kv' head dim,
'patch' conv input channels. Initialisation follows the reference `_init_weights`: Xavier-uniform
linear kernels, zero biases, LayerNorm 1/0. Kernels are stored (in, out); the fused qkv kernel is
(embed, 3, heads, kv), so a PyTorch (3D, D) weight maps over by reshape (3, H, Kd, D) + transpose.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax.models import attention
from bridle_jax.models import platform

Dtype = Any

LN_EPS = 1e-6
_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
_TANH_CUBIC = 0.044715


def partitioned(init, *axes):
  """`init` wrapped with logical axis names."""
  return nn.with_logical_partitioning(init, axes)


def layer_norm(dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm with eps 1e-6 and ('embed',)-named scale/bias."""
  return nn.LayerNorm(
      epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=partitioned(nn.initializers.ones, 'embed'),
      bias_init=partitioned(nn.initializers.zeros, 'embed'))


@jax.custom_vjp
def add_bias(y, bias):
  """y + bias (cast to y's dtype, broadcast over y's leading axes).

  The bias gradient is summed in float32. Autodiff of the 16-bit add would sum the
  16-bit output gradient in 16 bits, over every token of the batch: bf16 holds integers
  exactly only up to 256, so such a sum stalls long before 131k tokens.
  """
  return y + bias.astype(y.dtype)


def _add_bias_forward(y, bias):
  return add_bias(y, bias), bias


def bias_gradient(grad, bias):
  """The gradient of `bias` added over `grad`'s leading axes: their sum, in float32."""
  axes = tuple(range(grad.ndim - bias.ndim))
  return jnp.sum(grad, axis=axes, dtype=jnp.float32).astype(bias.dtype)


def _add_bias_backward(bias, grad):
  return grad, bias_gradient(grad, bias)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def broadcast_param(param, shape, dtype):
  """`param` broadcast to `shape`, then cast to `dtype`, so its gradient sums in the
  param's own dtype (see `add_bias`)."""
  return jnp.broadcast_to(param, shape).astype(dtype)


class Dense(nn.Module):
  """Linear layer as `nn.Dense` (params kernel (in, features), bias), matmul in `dtype`,
  the bias added by `add_bias`. `float32_output` keeps the matmul's float32 accumulator
  as the output (for logits)."""
  features: int
  axes: tuple[str | None, str | None]  # logical names of the kernel's (in, out) axes
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True
  float32_output: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', partitioned(nn.initializers.xavier_uniform(), *self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    y = jax.lax.dot_general(
        jnp.asarray(x, self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32 if self.float32_output else None)
    if self.use_bias:
      bias = self.param('bias', partitioned(nn.initializers.zeros, self.axes[1]),
                        (self.features,), self.param_dtype)
      y = add_bias(y, bias)
    return y


def dense(features: int, axes: tuple[str | None, str | None], dtype: Dtype,
          param_dtype: Dtype, name: str | None = None, use_bias: bool = True,
          float32_output: bool = False) -> Dense:
  """Xavier-uniform Linear with zero bias; `axes` names the (in, out) kernel axes."""
  return Dense(features, axes, dtype, param_dtype, use_bias, float32_output, name=name)


def _gelu_cdf(x):
  """Φ(x) = (1 + erf(x / √2)) / 2 of float32 x."""
  return 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


@jax.custom_vjp
def gelu(x):
  """Exact GELU x·Φ(x) in PyTorch's erf form, computed in float32, returned in x's dtype.

  The backward recomputes Φ and the density from x, so the forward saves nothing but x.
  (`jax.nn.gelu(approximate=False)` goes through erfc and keeps its float32 intermediates
  for the backward: on an H200 those fusions took 17% of the audio encoder phase's step.)
  """
  return _gelu_forward(x)[0]


def _gelu_forward(x):
  xf = x.astype(jnp.float32)
  return (xf * _gelu_cdf(xf)).astype(x.dtype), x


def _gelu_backward(x, grad):
  xf = x.astype(jnp.float32)
  slope = _gelu_cdf(xf) + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
  return ((grad.astype(jnp.float32) * slope).astype(x.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


@jax.custom_vjp
def gelu_tanh(x):
  """GELU in its tanh approximation x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))/2, in x's dtype.

  Built for a GPU it is written in x's dtype, the form XLA:GPU folds with the preceding
  matmul's bias add into that matmul as a cuBLAS epilogue (computed in float32 there) where
  matmuls are cuBLAS calls, so the GELU takes no pass of its own; elsewhere it is computed
  in float32. It differs from the exact GELU by less than 5e-4. The backward computes the
  slope in float32 from the saved input.
  """
  return _gelu_tanh_forward(x)[0]


def _gelu_tanh_forward(x):
  inner = x if platform.backend() == 'gpu' else x.astype(jnp.float32)
  return jax.nn.gelu(inner, approximate=True).astype(x.dtype), x


def _gelu_tanh_backward(x, grad):
  # (1 + tanh(u)) / 2 = sigmoid(2u): in this form XLA:GPU fuses the slope into the fc1 bias
  # gradient's reduction; in the tanh form it wrote the float32 product out first.
  xf = x.astype(jnp.float32)
  s = jax.nn.sigmoid(2.0 * _SQRT_2_OVER_PI * (xf + _TANH_CUBIC * xf * xf * xf))
  slope = s + (2.0 * _SQRT_2_OVER_PI * xf * s * (1.0 - s)
               * (1.0 + 3.0 * _TANH_CUBIC * xf * xf))
  return ((grad.astype(jnp.float32) * slope).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_tanh_forward, _gelu_tanh_backward)

# `model.gelu`: 'exact' (the erf form, as the reference's nn.GELU) or 'tanh'.
GELU_FORMS = {'exact': gelu, 'tanh': gelu_tanh}


class Mlp(nn.Module):
  """fc1 -> GELU (`gelu`, a GELU_FORMS key) -> fc2."""
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  gelu: str = 'exact'

  @nn.compact
  def __call__(self, x):
    if self.gelu not in GELU_FORMS:
      raise ValueError(f"gelu {self.gelu!r} is not one of {', '.join(map(repr, GELU_FORMS))}")
    width = x.shape[-1]
    hidden = int(width * self.mlp_ratio)
    x = dense(hidden, ('embed', 'mlp'), self.dtype, self.param_dtype, 'fc1')(x)
    x = GELU_FORMS[self.gelu](x)
    return dense(width, ('mlp', 'embed'), self.dtype, self.param_dtype, 'fc2')(x)


class QKVProjection(nn.Module):
  """q/k/v projection with one (D, 3, heads, head_dim) kernel.

  fused=True: (..., D) -> (..., 3, heads, head_dim) from one matmul (what the window
  kernel reads); with bias_apart=True, (that projection without its bias, the (3, heads,
  head_dim) bias), for a kernel that adds the bias on chip.

  fused=False, for softmax attention: (q, k, v, value_bias), q, k and v each (..., heads,
  head_dim) from its own matmul on its slice of the kernel, so an attention call that
  takes them as separate operands (cuDNN) reads them as written instead of a copy of each
  slice of one fused output. Only q gets its bias there: a key bias adds the same logit to
  every key of a query, which softmax ignores, and since each query's weights sum to one
  the value bias passes through attention unchanged, so the caller adds `value_bias`
  (heads, head_dim) to the attention output or, cheaper, folds it into the output
  projection's bias (`HeadsProjection`). Both save a pass over k or v.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  fused: bool = True
  bias_apart: bool = False

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    shape = (width, 3, self.num_heads, width // self.num_heads)
    # Xavier over the (D, 3D) fan, like the reference's single (3D, D) Linear.
    kernel = self.param(
        'kernel',
        partitioned(nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3)),
                    'embed', None, 'heads', 'kv'),
        shape, self.param_dtype)
    bias = self.param('bias', partitioned(nn.initializers.zeros, None, 'heads', 'kv'),
                      shape[1:], self.param_dtype)
    x, kernel = jnp.asarray(x, self.dtype), kernel.astype(self.dtype)
    # Each matmul has one flat output axis and its bias one flat vector: the form in which
    # XLA:GPU adds the bias inside the cuBLAS call instead of in a pass of its own.
    matmul = lambda w: jnp.einsum('...d,de->...e', x, w.reshape(width, -1))
    unflatten = lambda t, axes: t.reshape(t.shape[:-1] + axes)
    if self.fused:
      if self.bias_apart:
        return unflatten(matmul(kernel), shape[1:]), bias
      return unflatten(add_bias(matmul(kernel), bias.reshape(-1)), shape[1:])
    q, k, v = (matmul(kernel[:, part]) for part in range(3))
    q = add_bias(q, bias[0].reshape(-1))
    return *(unflatten(t, shape[2:]) for t in (q, k, v)), bias[2]


class HeadsProjection(nn.Module):
  """Output projection: (..., heads, head_dim) -> (..., width).

  value_bias (heads, head_dim), optional: a bias of the input, folded into the output bias
  in the params' dtype (see `QKVProjection`).
  """
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, value_bias=None):
    shape = x.shape[-2:] + (self.width,)
    kernel = self.param(
        'kernel',
        partitioned(nn.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2),
                    'heads', 'kv', 'embed'),
        shape, self.param_dtype)
    bias = self.param('bias', partitioned(nn.initializers.zeros, 'embed'),
                      (self.width,), self.param_dtype)
    if value_bias is not None:
      bias = bias + jnp.einsum('hk,hkd->d', value_bias, kernel)
    x = jnp.asarray(x, self.dtype)
    return add_bias(jnp.einsum('...hk,hkd->...d', x, kernel.astype(self.dtype)), bias)


class Attention(nn.Module):
  """Multi-head self-attention over (B, N, D); logits and softmax in float32."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'  # see attention.IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x, valid_length: int | None = None):
    """valid_length: tokens after the first `valid_length` are padding, attended by none."""
    q, k, v, value_bias = QKVProjection(self.num_heads, self.dtype, self.param_dtype,
                                        fused=False, name='qkv')(x)  # each (B, N, heads, kv)
    out = attention.attend(q, k, v, self.attention_impl, valid_length=valid_length)
    return HeadsProjection(x.shape[-1], self.dtype, self.param_dtype, name='proj')(
        out, value_bias)


class Block(nn.Module):
  """Pre-norm timm block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  The residual stream keeps the input's dtype (float32 input: float32 residual, `dtype` matmuls).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'
  gelu: str = 'exact'

  @nn.compact
  def __call__(self, x, valid_length: int | None = None):
    y = layer_norm(self.dtype, self.param_dtype, 'norm1')(x)
    x = x + Attention(self.num_heads, self.dtype, self.param_dtype, self.attention_impl,
                      name='attn')(y, valid_length)
    y = layer_norm(self.dtype, self.param_dtype, 'norm2')(x)
    return x + Mlp(self.mlp_ratio, self.dtype, self.param_dtype, self.gelu, name='mlp')(y)


REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rematted(module_class, remat: str, static_argnums: tuple[int, ...] = ()):
  """`module_class` recomputed in the backward pass under policy `remat` (see REMAT_POLICIES).

  'none' returns it unchanged; 'full' keeps only each call's inputs; 'dots' also keeps the
  outputs of the weight matmuls. Parameter names do not change. `static_argnums` counts
  `self` as 0 and marks Python-valued arguments such as `deterministic`.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat {remat!r} is not one of {', '.join(map(repr, REMAT_POLICIES))}")
  if remat == 'none':
    return module_class
  return nn.remat(module_class, policy=REMAT_POLICIES[remat], static_argnums=static_argnums)


def _symmetric_uniform(bound: float):
  """Initializer drawing from U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class PatchProjection(nn.Module):
  """The patch conv's weights, applied as one matmul: (..., p, p, C) -> (..., width).

  Kernel (p, p, C, width) is Xavier-uniform over the (width, C*p*p) view; bias is PyTorch's
  Conv2d default U(+-1/sqrt(C*p*p)).
  """
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches):
    shape = patches.shape[-3:] + (self.width,)
    kernel = self.param(
        'kernel',
        partitioned(nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                    None, None, 'patch', 'embed'),
        shape, self.param_dtype)
    bias = self.param('bias', partitioned(_symmetric_uniform(1.0 / np.sqrt(np.prod(shape[:3]))),
                                          'embed'),
                      (self.width,), self.param_dtype)
    patches = jnp.asarray(patches, self.dtype)
    return add_bias(jnp.einsum('...ijc,ijcd->...d', patches, kernel.astype(self.dtype)), bias)


class PatchEmbed(nn.Module):
  """Non-overlapping patch conv: (B, H, W, C) or (B, H, W) -> (B, (H/p)(W/p), width).

  Tokens come out row-major over the (H/p, W/p) grid; for audio (B, time, freq) that is
  k = grid_f * t + f, as in the reference. The stride-p conv runs as a reshape and one
  matmul (`PatchProjection`, params `proj/kernel` (p, p, C, width) and `proj/bias`): cuDNN's
  strided conv and its layout changes cost more than the projection itself on GPUs.
  """
  width: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[..., None]
    b, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f'PatchEmbed: input {h}x{w} is not a multiple of patch size {p}')
    patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    tokens = PatchProjection(self.width, self.dtype, self.param_dtype, name='proj')(patches)
    return tokens.reshape(b, -1, self.width)
