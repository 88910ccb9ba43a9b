"""Quantizer tests against a loop-based NumPy reference of the official formulas."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bridle_jax.models import quantizer as qz

BETA = 0.25
DECAY = 0.99


def _spec(**overrides):
  base = dict(type="rq", num_codebooks=3, codebook_size=8, code_dim=6, decay=DECAY,
              commitment_weight=BETA, kmeans_init=False, kmeans_iters=4,
              restart_unused=True, soft_code=1, soft_code_farthest=False)
  base.update(overrides)
  return qz.QuantizerSpec(**base)


def _normal(seed, shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- NumPy reference (float64, explicit loops) ----

def np_normalize(v):
  return v / max(np.sqrt(np.sum(v * v)), 1e-12)


def np_select(u, book, soft, farthest):
  dist = [float(np.sum((u - row) ** 2)) for row in book]
  if soft == 1:
    return [int(np.argmin(dist))]
  order = sorted(range(len(book)), key=lambda k: dist[k], reverse=farthest)
  return order[:soft]


def np_quantize(books, z, soft=1, farthest=False, normalize_input=False, training=False):
  """Returns (z_q, codes, losses, counts, sums, residuals after each stage). `training`:
  each stage looks its rows up after its EMA step (the reference's 'rq' training mode)."""
  books = np.array(books, np.float64)
  num_stages, size, dim = books.shape
  x = np.asarray(z, np.float64).reshape(-1, dim)
  if normalize_input:
    x = np.stack([np_normalize(row) for row in x])
  residual, total = x.copy(), np.zeros_like(x)
  codes, losses, after = [], [], []
  counts = np.zeros((num_stages, size))
  sums = np.zeros((num_stages, size, dim))
  for s in range(num_stages):
    stage_codes = np.zeros((len(x), soft), np.int64)
    e = np.zeros_like(x)
    for i in range(len(x)):
      u = np_normalize(residual[i])
      chosen = np_select(u, books[s], soft, farthest)
      stage_codes[i] = chosen
      for k in chosen:
        counts[s, k] += 1
        sums[s, k] += u
    if training:
      books[s] = np_ema(books[s:s + 1], 0.0, counts[s:s + 1], sums[s:s + 1], False)[0][0]
    for i in range(len(x)):
      for k in stage_codes[i]:
        e[i] += books[s, k]
    losses.append((1.0 + BETA) * np.mean((residual - e) ** 2))
    residual = residual - e
    total += e
    codes.append(stage_codes)
    after.append(residual.copy())
  return total, np.concatenate(codes, 1), np.array(losses), counts, sums, after


def np_ema(books, cluster_size, counts, sums, renormalize):
  books = np.array(books, np.float64)
  for s in range(books.shape[0]):
    for k in range(books.shape[1]):
      if counts[s, k] > 0:
        mean = np_normalize(sums[s, k] / max(counts[s, k], 1.0))
      else:
        mean = books[s, k].copy()
      books[s, k] = DECAY * books[s, k] + (1 - DECAY) * mean
      if renormalize:
        books[s, k] = np_normalize(books[s, k])
  return books, DECAY * np.asarray(cluster_size) + (1 - DECAY) * np.asarray(counts)


def np_kmeans_init(z, indices, iters, size):
  residual = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
  books, sizes = [], []
  for s in range(len(indices)):
    u = np.stack([np_normalize(row) for row in residual])
    means = u[indices[s]].copy()
    for _ in range(iters):
      assign = [int(np.argmax([row @ m for m in means])) for row in u]
      counts = np.zeros(size)
      sums = np.zeros_like(means)
      for i, k in enumerate(assign):
        counts[k] += 1
        sums[k] += u[i]
      for k in range(size):
        if counts[k] > 0:
          means[k] = np_normalize(sums[k] / counts[k])
    for i in range(len(residual)):
      residual[i] = residual[i] - means[np_select(u[i], means, 1, False)[0]]
    books.append(means)
    sizes.append(counts)
  return np.stack(books), np.stack(sizes)


def np_restart(books, z, indices):
  """Reference order per stage: assign, restart the codes nobody chose, subtract the rows
  of the codes assigned before the restart; the next stage works on what is left."""
  residual = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
  out = np.array(books, np.float64)
  for s in range(len(out)):
    u = np.stack([np_normalize(row) for row in residual])
    assigned = [np_select(row, out[s], 1, False)[0] for row in u]
    for k in range(out.shape[1]):
      if k not in assigned:
        out[s, k] = u[indices[s, k]]
    residual = residual - out[s, assigned]
  return out


# ---- config and init ----

def _audio_quantizer_config():
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "audio.py"
  module_spec = importlib.util.spec_from_file_location("audio_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config().model.quantizer


def test_spec_from_audio_config():
  spec = qz.quantizer_spec_from_config(_audio_quantizer_config())
  assert (spec.type, spec.num_codebooks, spec.codebook_size, spec.code_dim) == (
      "rq", 4, 256, 256)
  assert spec.decay == 0.99 and spec.commitment_weight == 0.25 and spec.kmeans_init


@pytest.mark.parametrize("field,value,message", [
    ("type", "pq", "model.quantizer.type"),
    ("num_codebooks", 0, "model.quantizer.num_codebooks"),
    ("soft_code", 300, "model.quantizer.soft_code"),
    ("decay", 1.0, "model.quantizer.decay"),
])
def test_spec_rejects_invalid_config(field, value, message):
  cfg = _audio_quantizer_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=message):
    qz.quantizer_spec_from_config(cfg)


def test_vq_requires_one_codebook():
  with pytest.raises(ValueError, match="model.quantizer.num_codebooks"):
    _spec(type="vq", num_codebooks=2)


def test_init_rows():
  rng = jax.random.PRNGKey(0)
  uniform = qz.init(_spec(), rng)
  assert uniform.codebooks.shape == (3, 8, 6) and uniform.codebooks.dtype == jnp.float32
  assert uniform.cluster_size.shape == (3, 8) and bool(uniform.initted.all())
  assert float(uniform.codebooks.min()) >= 0.0 and float(uniform.codebooks.max()) < 1.0
  pending = qz.init(_spec(kmeans_init=True), rng)
  assert not bool(pending.initted.any()) and float(pending.codebooks.min()) < 0.0
  vq = qz.init(_spec(type="vq", num_codebooks=1), rng)
  np.testing.assert_allclose(np.linalg.norm(vq.codebooks, axis=-1), 1.0, rtol=1e-6)


# ---- quantize ----

def _state(spec, seed=1):
  books = _normal(seed, (spec.num_codebooks, spec.codebook_size, spec.code_dim))
  return qz.init(spec, jax.random.PRNGKey(0)).replace(codebooks=jnp.asarray(books))


def test_quantize_matches_numpy():
  spec = _spec()
  state = _state(spec)
  z = _normal(2, (4, 12, 6))
  z_q, codes, losses, stats = qz.quantize(spec, state, jnp.asarray(z))
  ref_q, ref_codes, ref_losses, ref_counts, ref_sums, _ = np_quantize(state.codebooks, z)
  assert codes.dtype == jnp.int32 and codes.shape == (4, 12, 3)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1, 3), ref_codes)
  np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 6), ref_q, atol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_array_equal(stats.counts, ref_counts)
  np.testing.assert_allclose(stats.sums, ref_sums, atol=1e-5)


def test_training_lookup_uses_each_stages_rows_after_its_ema_step():
  spec = _spec()
  state = _state(spec)
  z = _normal(2, (4, 12, 6))
  z_q, codes, losses, stats = qz.quantize(spec, state, jnp.asarray(z), training=True)
  ref_q, ref_codes, ref_losses, ref_counts, ref_sums, _ = np_quantize(state.codebooks, z,
                                                                       training=True)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1, 3), ref_codes)
  np.testing.assert_allclose(np.asarray(z_q).reshape(-1, 6), ref_q, atol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_array_equal(stats.counts, ref_counts)
  np.testing.assert_allclose(stats.sums, ref_sums, atol=1e-5)
  # The rows looked up are those `ema_update` then stores; before it they were not.
  eval_q = qz.quantize(spec, state, jnp.asarray(z))[0]
  assert np.abs(np.asarray(eval_q) - np.asarray(z_q)).max() > 1e-4
  # The EMA'd rows are constants: the gradient is that of the same lookup from a state
  # that already holds them (these codes do not change under the step).
  updated = qz.ema_update(spec, state, stats)
  np.testing.assert_array_equal(qz.quantize(spec, updated, jnp.asarray(z))[1], codes)
  loss_of = lambda z, state, training: qz.quantize(spec, state, z, training=training)[2].sum()
  np.testing.assert_allclose(jax.grad(loss_of)(jnp.asarray(z), state, True),
                             jax.grad(loss_of)(jnp.asarray(z), updated, False), atol=1e-7)


@pytest.mark.parametrize("farthest", [False, True])
def test_soft_codes_match_numpy(farthest):
  spec = _spec(num_codebooks=2, soft_code=2, soft_code_farthest=farthest)
  state = _state(spec)
  z = _normal(3, (20, 6))
  z_q, codes, losses, stats = qz.quantize(spec, state, jnp.asarray(z))
  ref_q, ref_codes, ref_losses, ref_counts, ref_sums, _ = np_quantize(
      state.codebooks, z, soft=2, farthest=farthest)
  assert codes.shape == (20, 4)
  np.testing.assert_array_equal(codes, ref_codes)
  np.testing.assert_allclose(z_q, ref_q, atol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_array_equal(stats.counts, ref_counts)
  np.testing.assert_array_equal(stats.counts.sum(-1), [40, 40])
  np.testing.assert_allclose(stats.sums, ref_sums, atol=1e-5)


def test_ema_update_matches_numpy():
  spec = _spec()
  state = _state(spec).replace(cluster_size=jnp.asarray(_normal(4, (3, 8)) ** 2))
  counts = np.random.default_rng(5).integers(0, 3, (3, 8)).astype(np.float32)
  counts[:, 0] = 0.0
  sums = _normal(6, (3, 8, 6)) * counts[..., None]
  stats = qz.CodebookStats(counts=jnp.asarray(counts), sums=jnp.asarray(sums))
  updated = qz.ema_update(spec, state, stats)
  ref_books, ref_sizes = np_ema(state.codebooks, state.cluster_size, counts, sums, False)
  np.testing.assert_allclose(updated.codebooks, ref_books, atol=1e-6)
  np.testing.assert_allclose(updated.cluster_size, ref_sizes, rtol=1e-6)
  np.testing.assert_allclose(updated.codebooks[:, 0], state.codebooks[:, 0], rtol=1e-6)
  assert not np.allclose(np.linalg.norm(updated.codebooks, axis=-1), 1.0)


def test_vq_normalises_input_and_rows():
  spec = _spec(type="vq", num_codebooks=1)
  state = qz.init(spec, jax.random.PRNGKey(3))
  z = _normal(7, (30, 6)) * 5.0
  z_q, codes, losses, stats = qz.quantize(spec, state, jnp.asarray(z))
  ref_q, ref_codes, ref_losses, ref_counts, ref_sums, _ = np_quantize(
      state.codebooks, z, normalize_input=True)
  np.testing.assert_array_equal(codes, ref_codes)
  np.testing.assert_allclose(z_q, ref_q, atol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  updated = qz.ema_update(spec, state, stats)
  ref_books, _ = np_ema(state.codebooks, state.cluster_size, ref_counts, ref_sums, True)
  np.testing.assert_allclose(updated.codebooks, ref_books, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(updated.codebooks, axis=-1), 1.0, rtol=1e-6)


# ---- k-means and restart ----

def test_sample_row_indices():
  spec = _spec()
  distinct = qz.sample_row_indices(spec, 10, jax.random.PRNGKey(0), distinct=True)
  assert distinct.shape == (3, 8) and distinct.dtype == jnp.int32
  assert all(len(set(row.tolist())) == 8 for row in np.asarray(distinct))
  few = qz.sample_row_indices(spec, 3, jax.random.PRNGKey(0), distinct=True)
  assert few.shape == (3, 8) and int(few.min()) >= 0 and int(few.max()) < 3


@pytest.mark.parametrize("shape", [(5, 8, 6), (6, 6)], ids=["distinct", "too_few_rows"])
def test_kmeans_init_matches_numpy(shape):
  spec = _spec(kmeans_init=True)
  state = qz.init(spec, jax.random.PRNGKey(0))
  z = _normal(8, shape)
  rng = jax.random.PRNGKey(9)
  indices = qz.sample_row_indices(spec, z.size // 6, rng, distinct=True)
  inited = qz.kmeans_init_with_indices(spec, state, jnp.asarray(z), indices)
  ref_books, ref_sizes = np_kmeans_init(z, np.asarray(indices), spec.kmeans_iters, 8)
  if z.size // 6 < 8:  # duplicated seeds leave clusters empty, which keep their seed
    assert (ref_sizes == 0).any()
  np.testing.assert_allclose(inited.codebooks, ref_books, atol=1e-5)
  np.testing.assert_array_equal(inited.cluster_size, ref_sizes)
  assert bool(inited.initted.all())
  drawn = qz.kmeans_init(spec, state, jnp.asarray(z), rng)
  np.testing.assert_array_equal(drawn.codebooks, inited.codebooks)


def test_restart_matches_numpy():
  spec = _spec(codebook_size=16)
  state = _state(spec)
  z = _normal(10, (12, 6))
  _, _, _, stats = qz.quantize(spec, state, jnp.asarray(z))
  assert int((stats.counts == 0).sum()) > 0
  indices = qz.sample_row_indices(spec, 12, jax.random.PRNGKey(4), distinct=False)
  restarted = qz.restart_unused_with_indices(spec, state, jnp.asarray(z), indices)
  ref = np_restart(state.codebooks, z, np.asarray(indices))
  np.testing.assert_allclose(restarted.codebooks, ref, atol=1e-6)
  # Positions keep the (live) codes they chose, so every stage sees the residuals of a
  # plain quantize, and its live codes stay put.
  live = np.asarray(stats.counts) > 0
  np.testing.assert_array_equal(np.asarray(restarted.codebooks)[live],
                                np.asarray(state.codebooks)[live])


# ---- gradients, precision ----

def test_straight_through_gradient_is_identity():
  spec = _spec()
  state = _state(spec)
  z = jnp.asarray(_normal(11, (2, 5, 6)))
  weights = jnp.asarray(_normal(12, (2, 5, 6)))
  grad = jax.grad(lambda z: jnp.sum(qz.quantize(spec, state, z)[0] * weights))(z)
  np.testing.assert_array_equal(grad, weights)


def test_commitment_gradient_reaches_z_only():
  spec = _spec()
  state = _state(spec)
  z = _normal(13, (10, 6))

  def total_loss(z, codebooks):
    return qz.quantize(spec, state.replace(codebooks=codebooks), z)[2].sum()

  grad_z, grad_books = jax.grad(total_loss, argnums=(0, 1))(jnp.asarray(z), state.codebooks)
  _, _, _, _, _, residuals = np_quantize(state.codebooks, z)
  expected = 2.0 * BETA / z.size * sum(residuals)
  np.testing.assert_allclose(grad_z, expected, atol=1e-6)
  np.testing.assert_array_equal(grad_books, 0.0)


def test_bf16_input_and_large_counts_stay_float32_and_finite():
  spec = _spec(num_codebooks=2, codebook_size=4, code_dim=4)
  state = qz.init(spec, jax.random.PRNGKey(0))
  z = jnp.broadcast_to(jnp.asarray([0.3, -1.2, 0.5, 2.0], jnp.bfloat16), (70_000, 4))
  z_q, _, losses, stats = qz.quantize(spec, state, z)
  assert z_q.dtype == jnp.bfloat16 and losses.dtype == jnp.float32
  assert stats.counts.dtype == jnp.float32 and stats.sums.dtype == jnp.float32
  assert float(stats.counts.max()) == 70_000.0
  updated = qz.ema_update(spec, state, stats)
  assert updated.codebooks.dtype == jnp.float32
  assert bool(jnp.isfinite(updated.codebooks).all())
  np.testing.assert_allclose(updated.cluster_size.max(), 700.0, rtol=1e-5)


# ---- sharding ----

@pytest.mark.parametrize("training", [False, True])
def test_sharded_batch_matches_unsharded_and_replicates_codebooks(training):
  devices = jax.devices()
  assert len(devices) >= 8, "tests/conftest.py should provide 8 CPU devices"
  mesh = Mesh(np.asarray(devices[:8]), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  spec = _spec(kmeans_init=True)
  state = qz.init(spec, jax.random.PRNGKey(0))
  z = _normal(14, (16, 4, 6))
  rng = jax.random.PRNGKey(15)

  def step(state, z, rng):
    state = qz.kmeans_init(spec, state, z, rng)
    _, codes, _, stats = qz.quantize(spec, state, z, training=training)
    return qz.ema_update(spec, state, stats), stats, codes

  ref_state, ref_stats, ref_codes = jax.jit(step)(state, jnp.asarray(z), rng)
  z_sharded = jax.device_put(z, NamedSharding(mesh, PartitionSpec("data")))
  sharded_step = jax.jit(step, out_shardings=(replicated, replicated, None))
  new_state, stats, codes = sharded_step(jax.device_put(state, replicated), z_sharded, rng)
  np.testing.assert_array_equal(codes, ref_codes)
  np.testing.assert_array_equal(stats.counts, ref_stats.counts)
  np.testing.assert_allclose(stats.sums, ref_stats.sums, atol=1e-5)
  np.testing.assert_allclose(new_state.codebooks, ref_state.codebooks, atol=1e-6)
  shards = [np.asarray(shard.data) for shard in new_state.codebooks.addressable_shards]
  assert len(shards) == 8
  for shard in shards[1:]:
    np.testing.assert_array_equal(shard, shards[0])


def test_codebook_usage():
  used, perplexity = qz.codebook_usage(jnp.asarray([[2.0, 2.0, 0.0, 0.0],
                                                    [4.0, 0.0, 0.0, 0.0]]))
  np.testing.assert_allclose(used, [0.5, 0.25])
  np.testing.assert_allclose(perplexity, [2.0, 1.0], rtol=1e-6)

