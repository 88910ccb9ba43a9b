"""Fused multi-head attention through `jax.nn.dot_product_attention`, with backend choice.

Implementations: 'xla' (XLA's fused softmax attention; also the TPU path), 'cudnn' (cuDNN
flash attention, GPU only, bf16/fp16 inputs), 'auto' (cuDNN on a GPU where `resolve` finds
a dtype and head size it accepts, XLA everywhere else). cuDNN's training kernels refuse odd
sequence lengths (the ViT-B encoder sees 103 tokens at mask 0.8, the full-input ViTs 513),
so for it q, k and v are zero-padded to a multiple of `CUDNN_BLOCK` tokens and the padding
is excluded through the sequence-length arguments. On an H200 padding to even lengths was
fastest (`python -m bridle_jax.benchmark_attention` times the multiples on any GPU).
"""
import jax
import jax.numpy as jnp

from bridle_jax.models import platform

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
CUDNN_BLOCK = 2
HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # what "auto" sends to GPU kernels


def resolve(implementation: str | None, dtype, head_dim: int) -> str:
  """The concrete implementation ('xla' or 'cudnn') for `dtype` on `platform.backend()`.

  'auto' takes cuDNN only where every GPU generation it supports accepts the call: a
  16-bit dtype and a head size that is a multiple of 8, at most 128.
  """
  if implementation in (None, "auto"):
    on_gpu = platform.backend() == "gpu"
    fits = jnp.dtype(dtype) in HALF_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if on_gpu and fits else "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of "
                     f"{', '.join(map(repr, IMPLEMENTATIONS))}")
  return implementation


def padded_length(length: int, implementation: str | None, dtype, head_dim: int,
                  multiple: int = CUDNN_BLOCK) -> int:
  """The sequence length `attend` runs `length` tokens on (for cuDNN, rounded up to
  `multiple`). A model that pads its tokens to it once saves a copy of q, k, v and the
  output in every block (see `attend`'s `valid_length`)."""
  if resolve(implementation, dtype, head_dim) == "cudnn":
    return length + -length % multiple
  return length


def attend(q, k, v, implementation: str | None = "auto", *, bias=None, scale=None,
           pad_to: int | None = None, valid_length: int | None = None):
  """Softmax attention of q, k, v (B, N, heads, head_dim) -> (B, N, heads, head_dim).

  bias: additive logits, broadcastable to (B, heads, N, N). Logits and softmax are float32
  in both implementations. With cuDNN and N not a multiple of `pad_to` (default
  `CUDNN_BLOCK`), the call runs on N rounded up to it and returns the first N rows.
  valid_length: only the first `valid_length` keys are attended to; the caller padded the
  rest (their query rows are computed as any other and mean nothing).
  """
  implementation = resolve(implementation, q.dtype, q.shape[-1])
  pad_to = CUDNN_BLOCK if pad_to is None else pad_to
  if implementation == "cudnn" and bias is not None:
    bias = bias.astype(q.dtype)
  batch, length = q.shape[:2]
  valid = length if valid_length is None else valid_length
  lengths = lambda n: jnp.full((batch,), n, jnp.int32)
  padding = padded_length(length, implementation, q.dtype, q.shape[-1], pad_to) - length
  if not padding:
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, scale=scale,
        key_value_seq_lengths=None if valid == length else lengths(valid),
        implementation=implementation)
  pad_tokens = [(0, 0), (0, padding), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(t, pad_tokens) for t in (q, k, v))
  if bias is not None:
    bias = jnp.pad(jnp.broadcast_to(bias, (batch, q.shape[2], length, length)),
                   [(0, 0), (0, 0), (0, padding), (0, padding)])
  out = jax.nn.dot_product_attention(
      q, k, v, bias=bias, scale=scale, query_seq_lengths=lengths(length),
      key_value_seq_lengths=lengths(valid), implementation=implementation)
  return out[:, :length]
