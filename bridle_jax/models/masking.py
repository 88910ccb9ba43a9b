"""Random token masking (reference `random_masking` / `random_masking_2d`) and token gathers.

Both maskers return (ids_keep (B, keep) int32, mask (B, L) float32 with 1 = removed in original
token order, ids_restore (B, L) int32) where ids_restore inverts the shuffle that put kept tokens
first, so `restore_tokens` can put decoder tokens back in place.
"""
import jax
import jax.numpy as jnp

from bridle_jax.models import layers


def random_masking(rng: jax.Array, batch: int, num_patches: int, ratio: float):
  """Per-sample uniform masking; keeps int(L * (1 - ratio)) tokens in ascending-noise order."""
  keep = int(num_patches * (1 - ratio))
  noise = jax.random.uniform(rng, (batch, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  mask = (ids_restore >= keep).astype(jnp.float32)  # a token's rank in the shuffle
  return ids_shuffle[:, :keep], mask, ids_restore


def _kept_lines(rng: jax.Array, batch: int, size: int, prob: float) -> jax.Array:
  """(B, size) float mask with int(size * (1 - prob)) random zeros (kept) per row."""
  keep = int(size * (1 - prob))
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, size)), axis=1), axis=1)
  return (rank >= keep).astype(jnp.float32)


def random_masking_2d(rng: jax.Array, batch: int, grid_t: int, grid_f: int,
                      t_prob: float, f_prob: float):
  """Masks whole time rows and frequency columns of the (grid_t, grid_f) token grid.

  Keeps int(T(1 - t_prob)) rows and int(F(1 - f_prob)) columns; a token is removed if its row
  or its column is. Kept tokens stay in original order (sort key: index + L * mask; the
  reference's 999 only works for L < 999).
  """
  rng_t, rng_f = jax.random.split(rng)
  mask_t = _kept_lines(rng_t, batch, grid_t, t_prob)
  mask_f = _kept_lines(rng_f, batch, grid_f, f_prob)
  mask = 1 - (1 - mask_t[:, :, None]) * (1 - mask_f[:, None, :])
  mask = mask.reshape(batch, grid_t * grid_f)
  num_patches = grid_t * grid_f
  keep = int(grid_t * (1 - t_prob)) * int(grid_f * (1 - f_prob))
  sort_key = jnp.arange(num_patches)[None] + num_patches * mask.astype(jnp.int32)
  ids_shuffle = jnp.argsort(sort_key, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  return ids_shuffle[:, :keep], mask, ids_restore


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x (B, L, D), ids (B, K) -> (B, K, D) with row b = x[b, ids[b]]."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


def restore_tokens(kept: jax.Array, ids_restore: jax.Array, fill: jax.Array) -> jax.Array:
  """Appends `fill` (broadcast to D) for removed tokens and unshuffles: (B, K, D) -> (B, L, D)."""
  batch, num_kept, width = kept.shape
  filler = layers.broadcast_param(jnp.asarray(fill).reshape(1, 1, width),
                                  (batch, ids_restore.shape[1] - num_kept, width), kept.dtype)
  return gather_tokens(jnp.concatenate([kept, filler], axis=1), ids_restore)
