"""The Swin decoder's scaled cosine window attention as one fused Pallas kernel per pass.

XLA runs window attention as a dozen kernels over tensors as large as the activations
(16x16 logits per window and head in float32, their softmax, the normalised q and k, the
slices of the fused qkv); on an H200 those took about a fifth of the audio encoder
phase's step. Here one Triton program takes `WINDOWS_PER_PROGRAM` windows of one head
straight from the fused qkv projection and keeps the rest on chip: the projection's bias,
normalisation, logits, bias, shift mask, softmax and the weighted sum forward; the
recomputed softmax and all gradients backward, written straight into the fused layout
(the projection bias's gradient summed on chip too).
Off a GPU the kernels run in Pallas' interpreter (slow; for tests). Under a sharded jit
each device runs them on its own samples and heads (samples are never split).

Numerics follow `decoder.WindowAttention`'s XLA path, except that the projection's bias is
added in float32: q̂ = q / max(|q|, 1e-6) / max(τ, 0.01) and k̂ = k / max(|k|, 1e-6) in
float32, cast to the compute dtype for the logit matmul, logits and softmax in float32,
probabilities cast to the compute dtype for the sum over v.
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

from bridle_jax.models import platform

NORM_EPS = 1e-6
# The fastest program size on an H100 at the audio recipe's shapes (4x4 windows, head size
# 32, batch 128): 0.46 ms forward + backward per shifted block, against 0.50-0.82 ms for
# 8 or 16 windows and 1-4 warps (`python -m bridle_jax.benchmark_attention`).
WINDOWS_PER_PROGRAM = 4
NUM_WARPS = 1
INTERPRET = None  # None: compile on a GPU, interpret elsewhere; True/False force it


def unsupported_reason(window_tokens: int, head_dim: int) -> str | None:
  """Why the kernel cannot take these shapes (Triton tiles: powers of two, at least 16)."""
  for name, size in (("tokens per window", window_tokens), ("head dim", head_dim)):
    if size < 16 or size & (size - 1):
      return f"{name} must be a power of two >= 16 for the Pallas kernel, got {size}"
  return None


class Plan(NamedTuple):
  """A call's static layout: windows per sample, windows and warps per Triton program,
  and whether a shift mask applies."""
  num_windows: int
  per_program: int
  num_warps: int
  has_mask: bool


def _plan(num_windows: int, windows_per_program: int, num_warps: int, has_mask: bool) -> Plan:
  """Takes the largest power of two up to `windows_per_program` dividing num_windows."""
  if windows_per_program < 1 or windows_per_program & (windows_per_program - 1):
    raise ValueError(f"windows_per_program must be a power of two, got {windows_per_program}")
  g = windows_per_program
  while num_windows % g:
    g //= 2
  return Plan(num_windows, g, num_warps, has_mask)


def _unit(x):
  """(rows, dim) float32 -> (x / max(|x|, eps), (1 / max(|x|, eps), |x| < eps)) per row."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=1))
  inv_norm = 1.0 / jnp.maximum(norm, NORM_EPS)
  return x * inv_norm[:, None], (inv_norm, norm < NORM_EPS)


def _unit_backward(unit, scale, grad):
  """Cotangent of x from that of x / max(|x|, eps) (no projection where the eps applies)."""
  inv_norm, clamped = scale
  radial = jnp.where(clamped, 0.0, jnp.sum(grad * unit, axis=1))
  return inv_norm[:, None] * (grad - radial[:, None] * unit)


class _Window(NamedTuple):
  """One window's normalised q̂ = q/|q|·τ⁻¹ and k̂ = k/|k| (unit vectors and their scales in
  float32, q̂ and k̂ in the compute dtype) and its float32 logits."""
  q_unit: jax.Array
  q_scale: tuple
  q_hat: jax.Array
  k_unit: jax.Array
  k_scale: tuple
  k_hat: jax.Array
  logits: jax.Array


def _window(q, k, inv_tau, bias, mask, dtype) -> _Window:
  q_unit, q_scale = _unit(q.astype(jnp.float32))
  k_unit, k_scale = _unit(k.astype(jnp.float32))
  q_hat = (q_unit * inv_tau[:, None]).astype(dtype)
  k_hat = k_unit.astype(dtype)
  logits = jnp.dot(q_hat, k_hat.T, preferred_element_type=jnp.float32) + bias
  if mask is not None:
    logits = logits + mask
  return _Window(q_unit, q_scale, q_hat, k_unit, k_scale, k_hat, logits)


def _biased(refs, bias_refs, g):
  """Window g's q, k (float32) and v (its own dtype), each plus its bias."""
  q, k, v = (ref[g].astype(jnp.float32) + bias_ref[...][None]
             for ref, bias_ref in zip(refs, bias_refs))
  return q, k, v.astype(refs[2].dtype)


def _forward_kernel(q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref, tau_ref, bias_ref, mask_ref,
                    out_ref, lse_ref, *, plan: Plan):
  dtype = v_ref.dtype
  inv_tau, bias = tau_ref[...], bias_ref[...]
  for g in range(plan.per_program):
    mask = mask_ref[g] if plan.has_mask else None
    q, k, v = _biased((q_ref, k_ref, v_ref), (qb_ref, kb_ref, vb_ref), g)
    logits = _window(q, k, inv_tau, bias, mask, dtype).logits
    peak = jnp.max(logits, axis=1)
    weights = jnp.exp(logits - peak[:, None])
    total = jnp.sum(weights, axis=1)
    probs = (weights / total[:, None]).astype(dtype)
    out_ref[g] = jnp.dot(probs, v, preferred_element_type=jnp.float32).astype(dtype)
    lse_ref[g] = peak + jnp.log(total)


def _backward_kernel(q_ref, k_ref, v_ref, qb_ref, kb_ref, vb_ref, tau_ref, bias_ref, mask_ref,
                     out_ref, lse_ref, dout_ref, dqkv_ref, dtau_ref, dbias_ref, dqb_ref,
                     dkb_ref, dvb_ref, *, plan: Plan):
  dtype = v_ref.dtype
  head, first = pl.program_id(0), pl.program_id(1) * plan.per_program
  inv_tau, bias = tau_ref[...], bias_ref[...]
  dbias = jnp.zeros(bias.shape, jnp.float32)
  dtau = jnp.zeros(inv_tau.shape, jnp.float32)
  dqkv_bias = [jnp.zeros(qb_ref.shape, jnp.float32) for _ in range(3)]
  for g in range(plan.per_program):
    mask = mask_ref[g] if plan.has_mask else None
    q, k, v = _biased((q_ref, k_ref, v_ref), (qb_ref, kb_ref, vb_ref), g)
    w = _window(q, k, inv_tau, bias, mask, dtype)
    probs = jnp.exp(w.logits - lse_ref[g][:, None])
    dout = dout_ref[g]
    dv = jnp.dot(probs.astype(dtype).T, dout, preferred_element_type=jnp.float32)
    dprobs = jnp.dot(dout, v.T, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(dout.astype(jnp.float32) * out_ref[g].astype(jnp.float32), axis=1)
    dlogits = probs * (dprobs - row_dot[:, None])
    dbias += dlogits
    dlogits = dlogits.astype(dtype)
    dq_hat = jnp.dot(dlogits, w.k_hat, preferred_element_type=jnp.float32)
    dk_hat = jnp.dot(dlogits.T, w.q_hat, preferred_element_type=jnp.float32)
    dtau += jnp.sum(dq_hat * w.q_unit, axis=1)
    dq = _unit_backward(w.q_unit, w.q_scale, dq_hat * inv_tau[:, None])
    dk = _unit_backward(w.k_unit, w.k_scale, dk_hat)
    for part, grad in enumerate((dq, dk, dv)):  # straight into the fused (S, n, 3, H, K)
      dqkv_ref[first + g, :, part, head, :] = grad.astype(dqkv_ref.dtype)
      dqkv_bias[part] += jnp.sum(grad, axis=0)
  dbias_ref[...] = dbias
  dtau_ref[...] = dtau
  for ref, grad in zip((dqb_ref, dkb_ref, dvb_ref), dqkv_bias):
    ref[...] = grad


def _specs(qkv_shape, plan: Plan):
  """Block specs of the kernels' operands on a (heads, programs over windows) grid: heads
  vary fastest, so programs running together read whole qkv rows between them."""
  _, n, _, _, head_dim = qkv_shape
  g, mask_blocks = plan.per_program, plan.num_windows // plan.per_program

  def qkv_part(part):
    return pl.BlockSpec((g, n, None, None, head_dim), lambda h, i: (i, 0, part, h, 0))

  def qkv_bias_part(part):
    return pl.BlockSpec((None, None, head_dim), lambda h, i: (part, h, 0))

  return dict(
      q=qkv_part(0), k=qkv_part(1), v=qkv_part(2),
      qkv_bias=[qkv_bias_part(part) for part in range(3)],
      tau=pl.BlockSpec((None, n), lambda h, i: (h, 0)),
      bias=pl.BlockSpec((None, n, n), lambda h, i: (h, 0, 0)),
      mask=pl.BlockSpec((g, n, n), lambda h, i: (i % mask_blocks, 0, 0)),
      heads=pl.BlockSpec((g, n, None, head_dim), lambda h, i: (i, 0, h, 0)),
      lse=pl.BlockSpec((g, None, n), lambda h, i: (i, h, 0)),
      whole=pl.BlockSpec(memory_space=pl.ANY),
      partial_bias=pl.BlockSpec((None, None, n, n), lambda h, i: (i, h, 0, 0)),
      partial_tau=pl.BlockSpec((None, None, n), lambda h, i: (i, h, 0)),
      partial_qkv_bias=pl.BlockSpec((None, None, head_dim), lambda h, i: (i, h, 0)))


def _call(kernel, plan: Plan, qkv_shape, in_specs, out_specs, out_shape):
  """The kernel on a (heads, programs) grid over (all windows, n, 3, heads, head_dim)."""
  all_windows, heads = qkv_shape[0], qkv_shape[3]
  return pl.pallas_call(
      functools.partial(kernel, plan=plan), grid=(heads, all_windows // plan.per_program),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=platform.backend() != "gpu" if INTERPRET is None else INTERPRET,
      compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1))


# Axes of the ops' operands and results, all sample-major. "samples" follows the batch
# sharding and "heads" the heads sharding; the others (windows w, tokens n and m, the
# q/k/v part p, head dim k, programs per sample c) are kept whole on every device, so a
# device always holds whole samples.
_QKV = ("samples", "w", "n", "p", "heads", "k")
_QKV_BIAS = ("p", "heads", "k")
_HEADS = ("samples", "w", "n", "heads", "k")
_LSE = ("samples", "w", "heads", "n")
_TAU = ("heads", "n")
_BIAS = ("heads", "n", "m")
_MASK = ("w", "n", "m")
_PARTIAL_TAU = ("samples", "c", "heads", "n")
_PARTIAL_BIAS = ("samples", "c", "heads", "n", "m")
_PARTIAL_QKV_BIAS = ("samples", "c", "heads", "k")
_FORWARD_AXES = ((_QKV, _QKV_BIAS, _TAU, _BIAS, _MASK), (_HEADS, _LSE))
_BACKWARD_AXES = ((_QKV, _QKV_BIAS, _TAU, _BIAS, _MASK, _HEADS, _LSE, _HEADS),
                  (_QKV, _PARTIAL_TAU, _PARTIAL_BIAS) + (_PARTIAL_QKV_BIAS,) * 3)
_FACTORS = {"samples": "s", "heads": "h"}


def _partitioned(fn, axes):
  """fn(*arrays, plan) as an op that each device runs on its own samples and heads (as the
  operands are sharded), instead of on the whole batch."""
  arg_axes, result_axes = axes
  op = custom_partitioning(fn, static_argnums=(len(arg_axes),))

  def partition(plan, mesh, arg_shapes, result_shapes):
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 6
    mesh_axes = {"samples": spec[0], "heads": spec[4]}
    shard = lambda names: NamedSharding(mesh, PartitionSpec(*map(mesh_axes.get, names)))
    return (mesh, lambda *arrays: fn(*arrays, plan),
            tuple(map(shard, result_axes)), tuple(map(shard, arg_axes)))

  spell = lambda names: " ".join(_FACTORS.get(a, a) for a in names)
  rule = ", ".join(map(spell, arg_axes)) + " -> " + ", ".join(map(spell, result_axes))
  whole = tuple(dict.fromkeys(a for names in arg_axes + result_axes for a in names
                              if a not in _FACTORS))  # in order of first use
  op.def_partition(partition, sharding_rule=rule, need_replication_factors=whole)
  return op


def _forward_call(qkv, qkv_bias, tau_rows, bias, mask, plan):
  """(samples, windows, n, 3, H, K) -> out (samples, windows, n, H, K), lse."""
  samples, windows, n, _, heads, head_dim = qkv.shape
  flat = qkv.reshape(samples * windows, *qkv.shape[2:])
  s = _specs(flat.shape, plan)
  out, lse = _call(
      _forward_kernel, plan, flat.shape,
      [s["q"], s["k"], s["v"], *s["qkv_bias"], s["tau"], s["bias"], s["mask"]],
      [s["heads"], s["lse"]],
      [jax.ShapeDtypeStruct((samples * windows, n, heads, head_dim), qkv.dtype),
       jax.ShapeDtypeStruct((samples * windows, heads, n), jnp.float32)])(
           flat, flat, flat, qkv_bias, qkv_bias, qkv_bias, tau_rows, bias, mask)
  return (out.reshape(samples, windows, *out.shape[1:]),
          lse.reshape(samples, windows, *lse.shape[1:]))


def _backward_call(qkv, qkv_bias, tau_rows, bias, mask, out, lse, dout, plan):
  """Gradients: dqkv like qkv, and per-program partial sums of dtau, dbias and the q, k and
  v biases."""
  samples, windows, n, _, heads, head_dim = qkv.shape
  flat = lambda t: t.reshape(samples * windows, *t.shape[2:])
  programs = samples * windows // plan.per_program
  s = _specs(flat(qkv).shape, plan)
  dqkv, *partials = _call(
      _backward_kernel, plan, flat(qkv).shape,
      [s["q"], s["k"], s["v"], *s["qkv_bias"], s["tau"], s["bias"], s["mask"], s["heads"],
       s["lse"], s["heads"]],
      [s["whole"], s["partial_tau"], s["partial_bias"], *[s["partial_qkv_bias"]] * 3],
      [jax.ShapeDtypeStruct(flat(qkv).shape, qkv.dtype),
       jax.ShapeDtypeStruct((programs, heads, n), jnp.float32),
       jax.ShapeDtypeStruct((programs, heads, n, n), jnp.float32),
       *[jax.ShapeDtypeStruct((programs, heads, head_dim), jnp.float32)] * 3])(
           flat(qkv), flat(qkv), flat(qkv), qkv_bias, qkv_bias, qkv_bias, tau_rows, bias, mask,
           flat(out), flat(lse), flat(dout))
  per_sample = programs // samples
  return (dqkv.reshape(qkv.shape),
          *(p.reshape(samples, per_sample, *p.shape[1:]) for p in partials))


_forward_op = _partitioned(_forward_call, _FORWARD_AXES)
_backward_op = _partitioned(_backward_call, _BACKWARD_AXES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(qkv, qkv_bias, tau_rows, bias, mask, plan):
  return _forward_op(qkv, qkv_bias, tau_rows, bias, mask, plan)[0]


def _attention_forward(qkv, qkv_bias, tau_rows, bias, mask, plan):
  out, lse = _forward_op(qkv, qkv_bias, tau_rows, bias, mask, plan)
  return out, (qkv, qkv_bias, tau_rows, bias, mask, out, lse)


def _attention_backward(plan, residuals, dout):
  qkv, qkv_bias, tau_rows, bias, mask, out, lse = residuals
  dqkv, dtau, dbias, *dqkv_bias = _backward_op(qkv, qkv_bias, tau_rows, bias, mask, out, lse,
                                               dout.astype(qkv.dtype), plan)
  dqkv_bias = jnp.sum(jnp.stack(dqkv_bias), axis=(1, 2))  # (3, heads, head_dim)
  return (dqkv, dqkv_bias, jnp.sum(dtau, axis=(0, 1)), jnp.sum(dbias, axis=(0, 1)),
          jnp.zeros_like(mask))


_attention.defvjp(_attention_forward, _attention_backward)


def window_attention(qkv, inv_tau, bias, mask, *, qkv_bias=None,
                     windows_per_program: int = WINDOWS_PER_PROGRAM,
                     num_warps: int = NUM_WARPS):
  """Scaled cosine attention inside each window, fused.

  qkv: (batch, windows, n, 3, heads, head_dim) un-normalised projections of each sample's
  windows of n tokens; inv_tau: (heads,) 1 / max(τ, 0.01); bias: (heads, n, n) additive
  logits; mask: NumPy (windows, n, n) additive or None; qkv_bias: (3, heads, head_dim) or
  None, added to q, k and v on chip (no pass over the projection to add it beforehand;
  its gradient is summed in float32). Returns (batch, windows, n, heads, head_dim) in
  qkv's dtype; differentiable in qkv, qkv_bias, inv_tau and bias. `windows_per_program`
  (a power of two; lowered until it divides the windows) and `num_warps` set the Triton
  programs' size.
  """
  _, num_windows, n, parts, heads, head_dim = qkv.shape
  reason = unsupported_reason(n, head_dim)
  if reason:
    raise ValueError(f"window attention 'pallas': {reason}")
  if INTERPRET is None and platform.backend() not in ("gpu", "cpu"):
    raise ValueError(f"window attention 'pallas' is a GPU kernel; on "
                     f"{platform.backend()} use 'xla' (model.decoder.attention_impl)")
  if parts != 3:
    raise ValueError(f"window attention 'pallas': qkv {qkv.shape} is not (batch, windows, "
                     "n, 3, heads, head_dim)")
  plan = _plan(num_windows, windows_per_program, num_warps, has_mask=mask is not None)
  if mask is None:
    mask = np.zeros((num_windows, n, n), np.float32)
  if qkv_bias is None:
    qkv_bias = jnp.zeros((3, heads, head_dim), jnp.float32)
  if qkv_bias.shape != (3, heads, head_dim):
    raise ValueError(f"window attention 'pallas': qkv_bias {qkv_bias.shape} is not (3, heads, "
                     f"head_dim) = {(3, heads, head_dim)}")
  # 1/τ as one row of n per head: Triton blocks are vectors of at least 16, not scalars.
  tau_rows = jnp.broadcast_to(inv_tau.astype(jnp.float32)[:, None], (heads, n))
  return _attention(qkv, qkv_bias.astype(jnp.float32), tau_rows, bias.astype(jnp.float32),
                    jnp.asarray(mask, jnp.float32), plan)
