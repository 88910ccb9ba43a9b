"""The Swin decoder's scaled cosine window attention as one fused Pallas kernel per pass.

XLA runs window attention as a dozen kernels over tensors as large as the activations
(16x16 logits per window and head in float32, their softmax, the normalised q and k, the
slices of the fused qkv); on an H200 those took about a fifth of the audio encoder
phase's step. Here one Triton program takes `WINDOWS_PER_PROGRAM` windows of one head
straight from the fused qkv projection and keeps the rest on chip: normalisation, logits,
bias, shift mask, softmax and the weighted sum forward; the recomputed softmax and all
gradients backward. Off a GPU the kernels run in Pallas' interpreter (slow; for tests).
Under a sharded jit each device runs them on its own windows and heads.

Numerics follow `decoder.WindowAttention`'s XLA path: q̂ = q / max(|q|, 1e-6) / max(τ, 0.01)
and k̂ = k / max(|k|, 1e-6) in float32, cast to the compute dtype for the logit matmul,
logits and softmax in float32, probabilities cast to the compute dtype for the sum over v.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.experimental.pallas import triton as plgpu
from jax.sharding import NamedSharding, PartitionSpec

NORM_EPS = 1e-6
WINDOWS_PER_PROGRAM = 8
NUM_WARPS = 4
INTERPRET = None  # None: compile on a GPU, interpret elsewhere; True/False force it


def unsupported_reason(window_tokens: int, head_dim: int) -> str | None:
  """Why the kernel cannot take these shapes (Triton tiles: powers of two, at least 16)."""
  for name, size in (("tokens per window", window_tokens), ("head dim", head_dim)):
    if size < 16 or size & (size - 1):
      return f"{name} must be a power of two >= 16 for the Pallas kernel, got {size}"
  return None


class Plan(NamedTuple):
  """A call's static layout: windows per sample, windows per program, warps per program."""
  num_windows: int
  windows: int
  num_warps: int


def _plan(num_windows: int, windows_per_program: int, num_warps: int) -> Plan:
  """Takes the largest power of two up to `windows_per_program` dividing num_windows."""
  if windows_per_program < 1 or windows_per_program & (windows_per_program - 1):
    raise ValueError(f"windows_per_program must be a power of two, got {windows_per_program}")
  g = windows_per_program
  while num_windows % g:
    g //= 2
  return Plan(num_windows, g, num_warps)


def _unit(x):
  """(rows, dim) float32 -> (x / max(|x|, eps), 1 / max(|x|, eps), |x| < eps) per row."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=1))
  inv_norm = 1.0 / jnp.maximum(norm, NORM_EPS)
  return x * inv_norm[:, None], (inv_norm, norm < NORM_EPS)


def _unit_backward(unit, norm_info, grad):
  """Cotangent of x from that of x / max(|x|, eps) (no projection where the eps applies)."""
  inv_norm, clamped = norm_info
  radial = jnp.where(clamped, 0.0, jnp.sum(grad * unit, axis=1))
  return inv_norm[:, None] * (grad - radial[:, None] * unit)


def _logits(q_ref, k_ref, tau_ref, bias_ref, mask_ref, g, dtype):
  """Normalised q̂, k̂ (float32 and in `dtype`) and float32 logits of window g."""
  q_unit, q_norm = _unit(q_ref[g].astype(jnp.float32))
  k_unit, k_norm = _unit(k_ref[g].astype(jnp.float32))
  q_hat = (q_unit * tau_ref[...][:, None]).astype(dtype)
  k_hat = k_unit.astype(dtype)
  logits = jnp.dot(q_hat, k_hat.T, preferred_element_type=jnp.float32)
  logits = logits + bias_ref[...] + mask_ref[g]
  return q_unit, q_norm, q_hat, k_unit, k_norm, k_hat, logits


def _forward_kernel(q_ref, k_ref, v_ref, tau_ref, bias_ref, mask_ref, out_ref, lse_ref, *,
                    windows: int):
  dtype = v_ref.dtype
  for g in range(windows):
    logits = _logits(q_ref, k_ref, tau_ref, bias_ref, mask_ref, g, dtype)[-1]
    peak = jnp.max(logits, axis=1)
    weights = jnp.exp(logits - peak[:, None])
    total = jnp.sum(weights, axis=1)
    probs = (weights / total[:, None]).astype(dtype)
    out_ref[g] = jnp.dot(probs, v_ref[g], preferred_element_type=jnp.float32).astype(dtype)
    lse_ref[g] = peak + jnp.log(total)


def _backward_kernel(q_ref, k_ref, v_ref, tau_ref, bias_ref, mask_ref, out_ref, lse_ref,
                     dout_ref, dq_ref, dk_ref, dv_ref, dtau_ref, dbias_ref, *, windows: int):
  dtype = v_ref.dtype
  tau = tau_ref[...]
  dbias = jnp.zeros(bias_ref.shape, jnp.float32)
  dtau = jnp.zeros(tau_ref.shape, jnp.float32)
  for g in range(windows):
    q_unit, q_norm, q_hat, k_unit, k_norm, k_hat, logits = _logits(
        q_ref, k_ref, tau_ref, bias_ref, mask_ref, g, dtype)
    probs = jnp.exp(logits - lse_ref[g][:, None])
    dout = dout_ref[g]
    dv_ref[g] = jnp.dot(probs.astype(dtype).T, dout,
                        preferred_element_type=jnp.float32).astype(dv_ref.dtype)
    dprobs = jnp.dot(dout, v_ref[g].T, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(dout.astype(jnp.float32) * out_ref[g].astype(jnp.float32), axis=1)
    dlogits = probs * (dprobs - row_dot[:, None])
    dbias += dlogits
    dlogits = dlogits.astype(dtype)
    dq_hat = jnp.dot(dlogits, k_hat, preferred_element_type=jnp.float32)
    dk_hat = jnp.dot(dlogits.T, q_hat, preferred_element_type=jnp.float32)
    dtau += jnp.sum(dq_hat * q_unit, axis=1)
    dq_ref[g] = _unit_backward(q_unit, q_norm, dq_hat * tau[:, None]).astype(dq_ref.dtype)
    dk_ref[g] = _unit_backward(k_unit, k_norm, dk_hat).astype(dk_ref.dtype)
  dbias_ref[...] = dbias
  dtau_ref[...] = dtau


def _specs(qkv_shape, plan: Plan):
  """Block specs of the kernels' operands on a (programs over windows, heads) grid."""
  _, n, _, _, head_dim = qkv_shape
  windows, mask_blocks = plan.windows, plan.num_windows // plan.windows

  def qkv_part(part):
    return pl.BlockSpec((windows, n, None, None, head_dim), lambda i, h: (i, 0, part, h, 0))

  return dict(
      q=qkv_part(0), k=qkv_part(1), v=qkv_part(2),
      tau=pl.BlockSpec((None, n), lambda i, h: (h, 0)),
      bias=pl.BlockSpec((None, n, n), lambda i, h: (h, 0, 0)),
      mask=pl.BlockSpec((windows, n, n), lambda i, h: (i % mask_blocks, 0, 0)),
      heads=pl.BlockSpec((windows, n, None, head_dim), lambda i, h: (i, 0, h, 0)),
      lse=pl.BlockSpec((windows, None, n), lambda i, h: (i, h, 0)),
      partial_bias=pl.BlockSpec((None, None, n, n), lambda i, h: (i, h, 0, 0)),
      partial_tau=pl.BlockSpec((None, None, n), lambda i, h: (i, h, 0)))


def _call(kernel, plan: Plan, grid, in_specs, out_specs, out_shape):
  return pl.pallas_call(
      functools.partial(kernel, windows=plan.windows), grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape,
      interpret=jax.default_backend() != "gpu" if INTERPRET is None else INTERPRET,
      compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1))


# Axes of the kernels' operands and results. "windows" (S = batch x windows) and
# "programs" (S / windows per program) follow the batch sharding, "heads" the heads
# sharding; the others (tokens n and m, the q/k/v part p, head dim k, mask windows w) are
# kept whole on every device.
_QKV = ("windows", "n", "p", "heads", "k")
_HEADS = ("windows", "n", "heads", "k")
_LSE = ("windows", "heads", "n")
_TAU = ("heads", "n")
_BIAS = ("heads", "n", "m")
_MASK = ("w", "n", "m")
_FORWARD_AXES = ((_QKV, _TAU, _BIAS, _MASK), (_HEADS, _LSE))
_BACKWARD_AXES = ((_QKV, _TAU, _BIAS, _MASK, _HEADS, _LSE, _HEADS),
                  (_HEADS, _HEADS, _HEADS, ("programs", "heads", "n"),
                   ("programs", "heads", "n", "m")))
_SPLIT = ("windows", "programs", "heads")


def _partitioned(fn, axes):
  """fn(*arrays, plan) as an op that each device runs on its own share of the
  windows and heads (as the operands are sharded), instead of on the whole batch."""
  arg_axes, result_axes = axes
  op = custom_partitioning(fn, static_argnums=(len(arg_axes),))

  def partition(plan, mesh, arg_shapes, result_shapes):
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 5
    mesh_axes = {"windows": spec[0], "programs": spec[0], "heads": spec[3]}
    shard = lambda names: NamedSharding(mesh, PartitionSpec(*map(mesh_axes.get, names)))
    return (mesh, lambda *arrays: fn(*arrays, plan),
            tuple(map(shard, result_axes)), tuple(map(shard, arg_axes)))

  # Windows and programs are one factor: s (programs) times g (windows per program).
  per_program = any("programs" in names for names in result_axes)
  factors = {"windows": "(s g)" if per_program else "s", "programs": "s", "heads": "h"}
  spell = lambda names: " ".join(factors.get(a, a) for a in names)
  rule = ", ".join(map(spell, arg_axes)) + " -> " + ", ".join(map(spell, result_axes))
  whole = [a for names in arg_axes + result_axes for a in names if a not in _SPLIT]
  whole = tuple(dict.fromkeys((["g"] if per_program else []) + whole))  # first-use order

  def sharding_rule(plan, mesh, arg_types, result_types):
    sizes = dict(g=plan.windows) if per_program else {}
    return rule, dict(need_replication_factors=whole, **sizes)

  op.def_partition(partition, sharding_rule=sharding_rule)
  return op


def _forward_call(qkv, tau_rows, bias, mask, plan):
  sequences, n, _, heads, head_dim = qkv.shape
  s = _specs(qkv.shape, plan)
  return _call(
      _forward_kernel, plan, (sequences // plan.windows, heads),
      [s["q"], s["k"], s["v"], s["tau"], s["bias"], s["mask"]], [s["heads"], s["lse"]],
      [jax.ShapeDtypeStruct((sequences, n, heads, head_dim), qkv.dtype),
       jax.ShapeDtypeStruct((sequences, heads, n), jnp.float32)])(
           qkv, qkv, qkv, tau_rows, bias, mask)


def _backward_call(qkv, tau_rows, bias, mask, out, lse, dout, plan):
  sequences, n, _, heads, head_dim = qkv.shape
  programs = sequences // plan.windows
  s = _specs(qkv.shape, plan)
  grad = jax.ShapeDtypeStruct((sequences, n, heads, head_dim), qkv.dtype)
  return _call(
      _backward_kernel, plan, (programs, heads),
      [s["q"], s["k"], s["v"], s["tau"], s["bias"], s["mask"], s["heads"], s["lse"],
       s["heads"]],
      [s["heads"], s["heads"], s["heads"], s["partial_tau"], s["partial_bias"]],
      [grad, grad, grad, jax.ShapeDtypeStruct((programs, heads, n), jnp.float32),
       jax.ShapeDtypeStruct((programs, heads, n, n), jnp.float32)])(
           qkv, qkv, qkv, tau_rows, bias, mask, out, lse, dout)


_forward_op = _partitioned(_forward_call, _FORWARD_AXES)
_backward_op = _partitioned(_backward_call, _BACKWARD_AXES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(qkv, tau_rows, bias, mask, plan):
  return _forward_op(qkv, tau_rows, bias, mask, plan)[0]


def _attention_forward(qkv, tau_rows, bias, mask, plan):
  out, lse = _forward_op(qkv, tau_rows, bias, mask, plan)
  return out, (qkv, tau_rows, bias, mask, out, lse)


def _attention_backward(plan, residuals, dout):
  qkv, tau_rows, bias, mask, out, lse = residuals
  dq, dk, dv, dtau, dbias = _backward_op(qkv, tau_rows, bias, mask, out, lse,
                                         dout.astype(qkv.dtype), plan)
  return (jnp.stack([dq, dk, dv], axis=2), jnp.sum(dtau, axis=0), jnp.sum(dbias, axis=0),
          jnp.zeros_like(mask))


_attention.defvjp(_attention_forward, _attention_backward)


def window_attention(qkv, inv_tau, bias, mask, num_windows: int, *,
                     windows_per_program: int = WINDOWS_PER_PROGRAM,
                     num_warps: int = NUM_WARPS):
  """Scaled cosine attention inside each window, fused.

  qkv: (S, n, 3, heads, head_dim) un-normalised projections of S = batch x num_windows
  windows of n tokens, sample-major; inv_tau: (heads,) 1 / max(τ, 0.01); bias: (heads, n, n)
  additive logits; mask: NumPy (num_windows, n, n) additive or None, window s taking
  mask[s % num_windows]. Returns (S, n, heads, head_dim) in qkv's dtype; differentiable in
  qkv, inv_tau and bias. `windows_per_program` (a power of two; lowered until it divides
  num_windows) and `num_warps` set the Triton programs' size.
  """
  sequences, n, parts, heads, head_dim = qkv.shape
  reason = unsupported_reason(n, head_dim)
  if reason:
    raise ValueError(f"window attention 'pallas': {reason}")
  if INTERPRET is None and jax.default_backend() not in ("gpu", "cpu"):
    raise ValueError(f"window attention 'pallas' is a GPU kernel; on "
                     f"{jax.default_backend()} use 'xla' (model.decoder.attention_impl)")
  if parts != 3 or sequences % num_windows:
    raise ValueError(f"window attention 'pallas': qkv {qkv.shape} is not (batch x "
                     f"{num_windows} windows, n, 3, heads, head_dim)")
  if mask is None:
    mask = np.zeros((num_windows, n, n), np.float32)
  tau_rows = jnp.broadcast_to(inv_tau.astype(jnp.float32)[:, None], (heads, n))
  return _attention(qkv, tau_rows, bias.astype(jnp.float32), jnp.asarray(mask, jnp.float32),
                    _plan(num_windows, windows_per_program, num_warps))
