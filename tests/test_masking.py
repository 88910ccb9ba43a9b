"""Random 1-D / 2-D masking (§2.4, §2.5) and gather/restore helpers."""
import jax
import numpy as np

from bridle_jax.models import masking

# One compilation per call instead of op-by-op dispatch keeps the tests fast.
random_masking = jax.jit(masking.random_masking, static_argnums=(1, 2, 3))
random_masking_2d = jax.jit(masking.random_masking_2d, static_argnums=(1, 2, 3, 4, 5))


def check_consistent(ids_keep, mask, ids_restore):
  """ids_restore is a permutation, kept ids are unmasked and come first in the shuffle."""
  ids_keep, mask, ids_restore = map(np.asarray, (ids_keep, mask, ids_restore))
  keep = ids_keep.shape[1]
  for b in range(mask.shape[0]):
    assert sorted(ids_restore[b]) == list(range(mask.shape[1]))
    np.testing.assert_array_equal(np.argsort(ids_restore[b])[:keep], ids_keep[b])
    assert not mask[b, ids_keep[b]].any()


def test_random_masking_counts():
  ids_keep, mask, ids_restore = random_masking(jax.random.key(0), 4, 512, 0.8)
  assert ids_keep.shape == (4, 102) and mask.shape == ids_restore.shape == (4, 512)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), [410] * 4)
  check_consistent(ids_keep, mask, ids_restore)


def test_random_masking_differs_per_sample():
  _, mask, _ = random_masking(jax.random.key(1), 4, 512, 0.8)
  mask = np.asarray(mask)
  assert len({row.tobytes() for row in mask}) == 4


def test_gather_then_restore():
  batch, length, width = 3, 20, 5
  x = np.random.default_rng(2).normal(size=(batch, length, width)).astype(np.float32)
  fill = np.full((width,), -7.0, np.float32)
  ids_keep, mask, ids_restore = random_masking(jax.random.key(3), batch, length, 0.6)
  round_trip = jax.jit(lambda x, ids_keep, ids_restore: masking.restore_tokens(
      masking.gather_tokens(x, ids_keep), ids_restore, fill))
  restored = round_trip(x, ids_keep, ids_restore)
  np.testing.assert_array_equal(restored, np.where(np.asarray(mask)[..., None] > 0, fill, x))
  ids_keep, mask, ids_restore = random_masking(jax.random.key(4), batch, length, 0.0)
  assert not np.asarray(mask).any()
  np.testing.assert_array_equal(round_trip(x, ids_keep, ids_restore), x)


def test_2d_masking_rows_and_columns():
  ids_keep, mask, ids_restore = random_masking_2d(jax.random.key(5), 3, 64, 8, 0.7, 0.3)
  assert ids_keep.shape == (3, 95)
  check_consistent(ids_keep, mask, ids_restore)
  grid = 1 - np.asarray(mask).reshape(3, 64, 8)
  for b in range(3):
    rows, cols = grid[b].any(1), grid[b].any(0)
    assert rows.sum() == 19 and cols.sum() == 5
    np.testing.assert_array_equal(grid[b], np.outer(rows, cols))
  assert np.all(np.diff(np.asarray(ids_keep), axis=1) > 0)  # original order


def test_2d_masking_order_on_large_grid():
  # 1600 tokens: a sort key of index + 999 * mask would interleave kept and removed tokens.
  ids_keep, mask, ids_restore = random_masking_2d(jax.random.key(6), 2, 40, 40, 0.5, 0.5)
  assert ids_keep.shape == (2, 400)
  check_consistent(ids_keep, mask, ids_restore)
  assert np.all(np.diff(np.asarray(ids_keep), axis=1) > 0)
