"""Augmentations: roll + gain and waveform mixup on the host; SpecAugment and random erasing
on the device."""
import math

import jax
import jax.numpy as jnp
import numpy as np

ROLL_GAIN_BETA = 10.0  # gain = Beta(10, 10) + 0.5, in (0.5, 1.5)


def roll_mag(waveform: np.ndarray, rng: np.random.Generator,
             gain_only: bool = False) -> np.ndarray:
  """Circularly rolls the clip by a random offset, then scales it by a random gain.

  The offset is uniform in [0, len) and the gain is Beta(10, 10) + 0.5.

  `gain_only=True` reproduces the reference quirk: it draws the offset with
  `randint(len(array))` on a (1, T) array, so the offset is always 0 and only the
  gain is applied.
  """
  waveform = np.asarray(waveform, dtype=np.float32)
  shift = 0 if gain_only else int(rng.integers(waveform.shape[0]))
  gain = np.float32(rng.beta(ROLL_GAIN_BETA, ROLL_GAIN_BETA) + 0.5)
  out = np.roll(waveform, shift)  # a new array, so the gain can go in place
  out *= gain
  return out


def sample_mixup_lambda(rng: np.random.Generator, alpha: float = 10.0) -> float:
  """Mixing weight lambda ~ Beta(alpha, alpha)."""
  return float(rng.beta(alpha, alpha))


def mix_waveforms(w1: np.ndarray, w2: np.ndarray, lam: float) -> np.ndarray:
  """lam * w1 + (1 - lam) * w2 with w2 zero-padded or cut to len(w1), re-centred."""
  w1 = np.asarray(w1, dtype=np.float32)
  w2 = np.asarray(w2, dtype=np.float32)[:w1.shape[0]]
  w2 = np.pad(w2, (0, w1.shape[0] - w2.shape[0]))
  mixed = lam * w1 + (1.0 - lam) * w2
  return (mixed - mixed.mean()).astype(np.float32)


def mix_labels(y1: np.ndarray, y2: np.ndarray, lam: float) -> np.ndarray:
  """Reference label rule: lam to clip 1's classes, 1 - lam to clip 2's.

  For multi-hot inputs this is lam * y1 + (1 - lam) * y2, so a class present in both
  clips gets exactly 1.
  """
  y1 = np.asarray(y1, dtype=np.float32)
  y2 = np.asarray(y2, dtype=np.float32)
  return (lam * y1 + (1.0 - lam) * y2).astype(np.float32)


def _axis_mask(rng: jax.Array, num_masks: int, size: int, mask_param: int) -> jax.Array:
  """(num_masks, size) bool masks as torchaudio's mask_along_axis draws them.

  Width v ~ U[0, mask_param), start v0 ~ U[0, size - v); cells from trunc(v0) to
  trunc(v0) + trunc(v) (exclusive) are masked.
  """
  width_key, start_key = jax.random.split(rng)
  width = jax.random.uniform(width_key, (num_masks, 1)) * mask_param
  start = jax.random.uniform(start_key, (num_masks, 1)) * (size - width)
  first = start.astype(jnp.int32)
  end = first + width.astype(jnp.int32)
  cells = jnp.arange(size)
  return (cells >= first) & (cells < end)


def spec_augment(fbank, rng: jax.Array, freqm: int, timem: int) -> jax.Array:
  """One frequency and one time mask (set to 0) per leading sample.

  Args:
    fbank: (..., frames, bins) spectrogram, before normalisation.
    rng: PRNG key.
    freqm: frequency mask width bound (static); < 1 disables it.
    timem: time mask width bound (static); < 1 disables it.

  Returns:
    fbank with masked cells zeroed; every leading sample gets its own masks.
  """
  frames, bins = fbank.shape[-2:]
  flat = jnp.reshape(fbank, (-1, frames, bins))
  freq_key, time_key = jax.random.split(rng)
  keep = jnp.ones(flat.shape, bool)
  if freqm >= 1:
    keep &= ~_axis_mask(freq_key, flat.shape[0], bins, freqm)[:, None, :]
  if timem >= 1:
    keep &= ~_axis_mask(time_key, flat.shape[0], frames, timem)[:, :, None]
  return jnp.reshape(jnp.where(keep, flat, 0.0), fbank.shape)


ERASE_AREA = (0.02, 1 / 3)      # fraction of the image
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10


def random_erasing(images, rng: jax.Array, probability: float) -> jax.Array:
  """timm's RandomErasing(mode='pixel', count 1) on normalised (B, H, W, C) images.

  With `probability` per image, a box of area fraction U(0.02, 1/3) and log-uniform aspect
  ratio in (0.3, 1/0.3), the first of ERASE_ATTEMPTS draws that fits strictly inside the
  image, is filled with N(0, 1) noise per pixel and channel; no box fits: nothing erased.
  """
  batch, height, width = images.shape[:3]
  keys = jax.random.split(rng, 6)
  area = height * width * jax.random.uniform(keys[0], (batch, ERASE_ATTEMPTS), minval=ERASE_AREA[0],
                                             maxval=ERASE_AREA[1])
  aspect = jnp.exp(jax.random.uniform(keys[1], (batch, ERASE_ATTEMPTS),
                                      minval=ERASE_LOG_ASPECT[0], maxval=ERASE_LOG_ASPECT[1]))
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits, axis=1)
  h = jnp.take_along_axis(h, first[:, None], 1)[:, 0]
  w = jnp.take_along_axis(w, first[:, None], 1)[:, 0]
  apply = (jax.random.uniform(keys[2], (batch,)) < probability) & fits.any(axis=1)
  top = jnp.floor(jax.random.uniform(keys[3], (batch,)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(keys[4], (batch,)) * (width - w + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
            & apply[:, None, None])
  noise = jax.random.normal(keys[5], images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)
