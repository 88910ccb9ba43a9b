"""Residual (RQ) and single-codebook (VQ) quantizers as pure functions over explicit state.

The codebooks and their EMA bookkeeping live in a `CodebookState` pytree that the train
step passes in and gets back; nothing is mutated in place. One training step is

    z_q, codes, losses, stats = quantize(spec, state, z, training=True)
    state = ema_update(spec, state, stats)

with `kmeans_init` run on the first batch (while `state.initted` is False) and
`restart_unused` called when the trainer wants a dead-code restart. All arithmetic is
float32 whatever dtype z arrives in.

Statistics are plain sums over every position of z. Under `jax.jit` with z sharded over
devices they are global sums, so every device applies the same update; this replaces
the reference's explicit all-reduces. For the same reason k-means and the restart see
the whole global batch and give every device the same codebooks, whereas the reference
runs k-means on each rank's local batch and never synchronises it when the restart is
off (reference quirk 12).

Types: 'rq' is the BRIDLE `RQBottleneck` (S codebooks applied to successive residuals,
EMA rows not re-normalised); 'vq' is the BEATs-style `NormEMAVectorQuantizer` (S = 1,
input l2-normalised first, rows re-normalised after each EMA step).
"""
import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

QUANTIZER_TYPES = ("rq", "vq")

_NORM_EPS = 1e-12  # the eps of torch.nn.functional.normalize
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """Static quantizer settings; mirrors the `model.quantizer` config block."""
  type: str = "rq"
  num_codebooks: int = 4
  codebook_size: int = 256
  code_dim: int = 256
  decay: float = 0.99
  commitment_weight: float = 0.25
  kmeans_init: bool = True
  kmeans_iters: int = 10
  restart_unused: bool = True
  soft_code: int = 1
  soft_code_farthest: bool = False

  def __post_init__(self):
    def fail(field, why):
      raise ValueError(f"model.quantizer.{field} = {getattr(self, field)!r}: {why}")

    if self.type not in QUANTIZER_TYPES:
      fail("type", f"unknown quantizer type (known: {', '.join(QUANTIZER_TYPES)})")
    for field in ("num_codebooks", "codebook_size", "code_dim", "kmeans_iters", "soft_code"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        fail(field, "must be a positive integer")
    if self.type == "vq" and self.num_codebooks != 1:
      fail("num_codebooks", "the 'vq' quantizer has exactly one codebook")
    if self.soft_code > self.codebook_size:
      fail("soft_code", "cannot exceed model.quantizer.codebook_size")
    if not 0.0 <= self.decay < 1.0:
      fail("decay", "must lie in [0, 1)")
    if self.commitment_weight < 0.0:
      fail("commitment_weight", "must be non-negative")


def quantizer_spec_from_config(quantizer_cfg: Any) -> QuantizerSpec:
  """Builds a validated `QuantizerSpec` from the `model.quantizer` config block."""
  values = {}
  for field in dataclasses.fields(QuantizerSpec):
    if field.name not in quantizer_cfg:
      raise ValueError(f"model.quantizer.{field.name} is missing from the config")
    values[field.name] = quantizer_cfg[field.name]
  return QuantizerSpec(**values)


@flax.struct.dataclass
class CodebookState:
  """Codebooks and bookkeeping; no padding row (the PyTorch converter adds it).

  codebooks: (S, K, D) float32 code rows.
  cluster_size: (S, K) float32 EMA of assignment counts (bookkeeping, read by nothing).
  initted: (S,) bool, False while a k-means initialisation is pending.
  """
  codebooks: jax.Array
  cluster_size: jax.Array
  initted: jax.Array


@flax.struct.dataclass
class CodebookStats:
  """Sums over all quantized positions of one batch.

  counts: (S, K) float32 number of assignments per code.
  sums: (S, K, D) float32 sum of the l2-normalised residuals assigned to each code.
  """
  counts: jax.Array
  sums: jax.Array


def init(spec: QuantizerSpec, rng: jax.Array) -> CodebookState:
  """Initial codebooks.

  With `kmeans_init` the rows are standard normal (k-means overwrites them on the first
  batch). Otherwise 'rq' rows are U[0, 1) (the reference's `init_weight_multiplier` 1.0)
  and 'vq' rows are l2-normalised standard normal. `initted` starts False only when a
  k-means initialisation is pending.
  """
  shape = (spec.num_codebooks, spec.codebook_size, spec.code_dim)
  if spec.kmeans_init:
    codebooks = jax.random.normal(rng, shape, jnp.float32)
  elif spec.type == "vq":
    codebooks = _l2normalize(jax.random.normal(rng, shape, jnp.float32))
  else:
    codebooks = jax.random.uniform(rng, shape, jnp.float32)
  return CodebookState(
      codebooks=codebooks,
      cluster_size=jnp.zeros(shape[:2], jnp.float32),
      initted=jnp.full((spec.num_codebooks,), not spec.kmeans_init))


def quantize(spec: QuantizerSpec, state: CodebookState, z: jax.Array, *,
             training: bool = False):
  """Quantizes z (..., D); returns (z_q, codes, losses, stats).

  Per stage s, on the residual r_s (r_0 = z; for 'vq' r_0 = l2normalize(z)):
    u = l2normalize(r_s); code = argmin_k |u - c_k|^2 over the raw rows c_k;
    e_s = c_code (raw, not re-normalised), where for 'rq' with `training` the rows c are
      this stage's codebook after the EMA step of this batch's stats (the reference's
      training-mode lookup; `ema_update` applies the same step to the state afterwards);
    losses[s] = mean((sg r_s - e_s)^2) + commitment_weight * mean((r_s - sg e_s)^2);
    r_{s+1} = r_s - e_s.
  z_q = r_0 + sg(sum_s e_s - r_0) in z's dtype, so for 'rq' d z_q / d z is the identity.
  The codebooks get no gradient (they change only by EMA); the commitment term sends
  gradient into z. The reference's loss is `losses.mean()`.

  With `soft_code` k > 1 each stage takes the k nearest codes, e_s is the sum of their
  rows, and codes holds k entries per stage (stage-major, nearest first); every chosen
  code counts once in the stats. `soft_code_farthest` reproduces the reference bug
  (`topk` of the distances, i.e. the k farthest codes, farthest first).

  The 'vq' quantizer looks its rows up before the EMA step, as the reference's does. With
  gradient accumulation each micro-batch looks up through its own stats' EMA step (so the
  codes of stages after the first depend slightly on the split), while the state takes
  one step with the summed stats.

  Returns:
    z_q: z's shape and dtype. codes: int32 (..., S * soft_code). losses: float32 (S,).
    stats: `CodebookStats` summed over all positions.
  """
  if z.shape[-1] != spec.code_dim:
    raise ValueError(f"quantize: last axis of z is {z.shape[-1]}, expected "
                     f"model.quantizer.code_dim = {spec.code_dim}")
  x = _flat_input(spec, z)
  codebooks = jax.lax.stop_gradient(state.codebooks)
  residual = x
  quantized = jnp.zeros_like(x)
  codes, losses, counts, sums = [], [], [], []
  for stage in range(spec.num_codebooks):
    u, idx = _assign(spec, codebooks[stage], residual)
    stage_counts, stage_sums = _code_stats(u, idx, spec.codebook_size)
    rows = codebooks[stage]
    if training and spec.type == "rq":
      rows = jax.lax.stop_gradient(_ema_rows(spec, rows, stage_counts, stage_sums))
    e = _lookup(rows, idx)
    codebook_term = jnp.mean((jax.lax.stop_gradient(residual) - e) ** 2)
    commitment_term = jnp.mean((residual - jax.lax.stop_gradient(e)) ** 2)
    losses.append(codebook_term + spec.commitment_weight * commitment_term)
    counts.append(stage_counts)
    sums.append(stage_sums)
    codes.append(idx)
    residual = residual - e
    quantized = quantized + e
  z_q = x + jax.lax.stop_gradient(quantized - x)
  z_q = z_q.reshape(z.shape).astype(z.dtype)
  codes = jnp.concatenate(codes, axis=-1).astype(jnp.int32)
  codes = codes.reshape(*z.shape[:-1], codes.shape[-1])
  stats = CodebookStats(counts=jnp.stack(counts), sums=jnp.stack(sums))
  return z_q, codes, jnp.stack(losses), stats


def stats_of_codes(spec: QuantizerSpec, codes: jax.Array) -> CodebookStats:
  """Stats of already assigned codes (..., S * soft_code): the counts of `quantize`, zero sums.

  For steps that reuse earlier codes: they need the usage counts, not an EMA update.
  """
  codes = codes.reshape(-1, spec.num_codebooks, spec.soft_code)
  counts = jax.nn.one_hot(codes, spec.codebook_size, dtype=jnp.float32).sum(axis=(0, 2))
  sums = jnp.zeros((spec.num_codebooks, spec.codebook_size, spec.code_dim), jnp.float32)
  return CodebookStats(counts=counts, sums=sums)


def ema_update(spec: QuantizerSpec, state: CodebookState,
               stats: CodebookStats) -> CodebookState:
  """Applies one EMA step with decay d (reference rule).

  cluster_size <- d * cluster_size + (1 - d) * n;
  m_k = l2normalize(s_k / max(n_k, 1)) where n_k > 0, else the current row c_k;
  c_k <- d * c_k + (1 - d) * m_k, re-normalised afterwards only for 'vq'.
  """
  counts = stats.counts.astype(jnp.float32)
  return state.replace(
      codebooks=_ema_rows(spec, state.codebooks, counts, stats.sums.astype(jnp.float32)),
      cluster_size=spec.decay * state.cluster_size + (1.0 - spec.decay) * counts)


def _ema_rows(spec: QuantizerSpec, rows: jax.Array, counts: jax.Array, sums: jax.Array):
  """Code rows (..., K, D) after one EMA step with counts (..., K) and sums (..., K, D)."""
  means = _l2normalize(sums / jnp.maximum(counts, 1.0)[..., None])
  means = jnp.where(counts[..., None] > 0, means, rows)
  rows = spec.decay * rows + (1.0 - spec.decay) * means
  return _l2normalize(rows) if spec.type == "vq" else rows


def sample_row_indices(spec: QuantizerSpec, num_rows: int, rng: jax.Array, *,
                       distinct: bool) -> jax.Array:
  """Draws (S, K) int32 row indices into a batch of `num_rows` positions.

  `distinct` draws without replacement while num_rows >= K (k-means seeds) and falls
  back to drawing with replacement for smaller batches, like the reference.
  """
  size = spec.codebook_size
  replace = not distinct or num_rows < size
  keys = jax.random.split(rng, spec.num_codebooks)
  return jnp.stack([jax.random.choice(key, num_rows, (size,), replace=replace)
                    for key in keys]).astype(jnp.int32)


def kmeans_init(spec: QuantizerSpec, state: CodebookState, z: jax.Array,
                rng: jax.Array) -> CodebookState:
  """k-means initialisation from randomly drawn seeds; see `kmeans_init_with_indices`."""
  indices = sample_row_indices(spec, _num_rows(z), rng, distinct=True)
  return kmeans_init_with_indices(spec, state, z, indices)


def kmeans_init_with_indices(spec: QuantizerSpec, state: CodebookState, z: jax.Array,
                             indices: jax.Array) -> CodebookState:
  """Initialises every codebook by cosine k-means on the batch z (..., D).

  Stages run in order, each on the residuals left by the freshly initialised stages
  before it (as the reference does on its first forward). At stage s the seeds are the
  normalised residuals u[indices[s]]; each of `kmeans_iters` iterations assigns by
  maximum dot product and sets every non-empty cluster's mean to the l2-normalised
  average of its members (empty clusters keep their mean). cluster_size is set to the
  counts of the last assignment and initted to True. Runs unconditionally: callers
  check `state.initted`. Under jit a sharded z yields the same codebooks on every device.
  """
  residual = _flat_input(spec, z)
  codebooks, sizes = [], []
  for stage in range(spec.num_codebooks):
    u = _l2normalize(residual)
    means, counts = _kmeans(u, u[indices[stage]], spec.kmeans_iters)
    residual = residual - _lookup(means, _assign(spec, means, residual)[1])
    codebooks.append(means)
    sizes.append(counts)
  return state.replace(
      codebooks=jnp.stack(codebooks), cluster_size=jnp.stack(sizes),
      initted=jnp.ones_like(state.initted, dtype=bool))


def restart_unused(spec: QuantizerSpec, state: CodebookState, z: jax.Array,
                   rng: jax.Array) -> CodebookState:
  """Dead-code restart from randomly drawn rows; see `restart_unused_with_indices`."""
  indices = sample_row_indices(spec, _num_rows(z), rng, distinct=False)
  return restart_unused_with_indices(spec, state, z, indices)


def restart_unused_with_indices(spec: QuantizerSpec, state: CodebookState, z: jax.Array,
                                indices: jax.Array) -> CodebookState:
  """Replaces every code that no position of the batch z chooses by a vector of z.

  Stages run in order, as in the reference's eval-mode forward: stage s assigns codes to
  the residual left by the stages before it, its codes chosen by no position are dead,
  dead code k becomes u_s[indices[s, k]], the normalised residual at that stage (the
  reference's candidate rows), and the next residual subtracts the rows of the codes
  assigned before the restart (which it left alone). (The reference's tokenizer phase
  restarts inside its first training-mode pass, whose residuals subtract post-EMA rows.)
  The counts are global sums over the batch, so every device restarts the same codes
  with the same rows.
  """
  residual = _flat_input(spec, z)
  codebooks = []
  for stage in range(spec.num_codebooks):
    u, idx = _assign(spec, state.codebooks[stage], residual)
    dead = _code_stats(u, idx, spec.codebook_size)[0] == 0
    codebook = jnp.where(dead[:, None], u[indices[stage]], state.codebooks[stage])
    residual = residual - _lookup(codebook, idx)  # idx holds live codes only
    codebooks.append(codebook)
  return state.replace(codebooks=jnp.stack(codebooks))


def codebook_usage(counts: jax.Array):
  """Per-codebook (fraction of codes used, perplexity) from (S, K) assignment counts."""
  counts = counts.astype(jnp.float32)
  used = jnp.mean((counts > 0).astype(jnp.float32), axis=-1)
  probs = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
  plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
  return used, jnp.exp(-plogp.sum(-1))


def _num_rows(z: jax.Array) -> int:
  return math.prod(z.shape[:-1])


def _flat_input(spec: QuantizerSpec, z: jax.Array) -> jax.Array:
  """z as (N, D) float32, l2-normalised for 'vq'."""
  x = z.astype(jnp.float32).reshape(-1, z.shape[-1])
  return _l2normalize(x) if spec.type == "vq" else x


def _l2normalize(x: jax.Array) -> jax.Array:
  """x / max(|x|, 1e-12) along the last axis, with a finite gradient at 0."""
  sq_norm = jnp.sum(x * x, axis=-1, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sq_norm, _NORM_EPS ** 2))


def _assign(spec: QuantizerSpec, codebook: jax.Array, residual: jax.Array):
  """One stage's search: returns (u (N, D), codes (N, soft_code))."""
  u = _l2normalize(residual)
  distances = (jnp.sum(u * u, axis=-1, keepdims=True)
               + jnp.sum(codebook * codebook, axis=-1)
               - 2.0 * jnp.matmul(u, codebook.T, precision=_HIGHEST))
  if spec.soft_code == 1:
    idx = jnp.argmin(distances, axis=-1)[:, None]
  elif spec.soft_code_farthest:
    _, idx = jax.lax.top_k(distances, spec.soft_code)
  else:
    _, idx = jax.lax.top_k(-distances, spec.soft_code)
  return u, idx


def _lookup(rows: jax.Array, idx: jax.Array) -> jax.Array:
  """The sum of the chosen rows (N, D) for codes idx (N, k)."""
  return jnp.take(rows, idx, axis=0).sum(axis=1)


def _code_stats(u: jax.Array, idx: jax.Array, codebook_size: int):
  """Counts (K,) and sums of u (K, D) of the codes in idx (N, k)."""
  assigned = jax.nn.one_hot(idx, codebook_size, dtype=jnp.float32).sum(axis=1)
  counts = assigned.sum(axis=0)
  sums = jnp.matmul(assigned.T, u, precision=_HIGHEST)
  return counts, sums


def _kmeans(u: jax.Array, means: jax.Array, iters: int):
  """Cosine k-means on unit rows u from seeds `means`; returns (means, last counts)."""
  size = means.shape[0]

  def step(_, carry):
    means, _ = carry
    idx = jnp.argmax(jnp.matmul(u, means.T, precision=_HIGHEST), axis=-1)
    assigned = jax.nn.one_hot(idx, size, dtype=jnp.float32)
    counts = assigned.sum(axis=0)
    sums = jnp.matmul(assigned.T, u, precision=_HIGHEST)
    updated = _l2normalize(sums / jnp.maximum(counts, 1.0)[:, None])
    return jnp.where(counts[:, None] > 0, updated, means), counts

  return jax.lax.fori_loop(0, iters, step, (means, jnp.zeros((size,), jnp.float32)))
