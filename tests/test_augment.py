"""Augmentations: roll + gain, waveform mixup and SpecAugment."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from bridle_jax.data import audio
from bridle_jax.data import augment

MEAN, STD = -4.4446096, 3.3216383


# ---- roll + gain --------------------------------------------------------------------


def _gain_and_shift(original, augmented):
  """Returns (gain, k) with augmented == gain * roll(original, k), or fails."""
  gain = augmented.sum() / original.sum()
  k = int(np.argmax(augmented)) - int(np.argmax(original))
  np.testing.assert_allclose(augmented, gain * np.roll(original, k), rtol=1e-5)
  return gain, k % original.shape[0]


def test_roll_mag_is_a_real_roll_times_a_gain():
  original = np.random.default_rng(0).uniform(0.1, 1.0, 1000).astype(np.float32)
  rng = np.random.default_rng(1)
  gains, shifts = [], []
  for _ in range(40):
    augmented = augment.roll_mag(original, rng)
    assert augmented.shape == original.shape and augmented.dtype == np.float32
    gain, shift = _gain_and_shift(original, augmented)
    gains.append(gain)
    shifts.append(shift)
  assert 0.5 < min(gains) and max(gains) < 1.5
  assert len(set(shifts)) > 30 and max(shifts) > 500


def test_roll_mag_gain_only_keeps_order():
  original = np.random.default_rng(0).uniform(0.1, 1.0, 1000).astype(np.float32)
  rng = np.random.default_rng(2)
  gains = []
  for _ in range(40):
    gain, shift = _gain_and_shift(original, augment.roll_mag(original, rng, gain_only=True))
    assert shift == 0
    gains.append(gain)
  assert 0.5 < min(gains) and max(gains) < 1.5 and np.std(gains) > 0.05


# ---- mixup --------------------------------------------------------------------------


def test_mix_waveforms_pads_or_cuts_and_recentres():
  w1 = np.arange(8, dtype=np.float32)
  mixed = augment.mix_waveforms(w1, np.full(5, 10.0, np.float32), 0.25)
  raw = 0.25 * w1 + 0.75 * np.array([10, 10, 10, 10, 10, 0, 0, 0], np.float32)
  np.testing.assert_allclose(mixed, raw - raw.mean(), atol=1e-6)
  mixed = augment.mix_waveforms(w1, np.arange(100, 112, dtype=np.float32), 0.5)
  raw = 0.5 * w1 + 0.5 * np.arange(100, 108)
  assert mixed.shape == (8,) and mixed.dtype == np.float32
  np.testing.assert_allclose(mixed, raw - raw.mean(), atol=1e-5)


def test_mix_labels_follows_the_reference_rule():
  y1 = np.array([1, 0, 1, 0, 0, 0], np.float32)  # classes 0 and 2
  y2 = np.array([0, 0, 1, 0, 0, 1], np.float32)  # classes 2 and 5
  mixed = augment.mix_labels(y1, y2, 0.3)
  np.testing.assert_allclose(mixed, [0.3, 0, 1.0, 0, 0, 0.7], atol=1e-7)
  assert mixed.dtype == np.float32


def test_sample_mixup_lambda_is_beta():
  draws = [augment.sample_mixup_lambda(np.random.default_rng(s)) for s in range(400)]
  assert 0.0 < min(draws) and max(draws) < 1.0
  assert abs(np.mean(draws) - 0.5) < 0.02
  assert abs(np.std(draws) - np.sqrt(1 / 84)) < 0.02  # Beta(10, 10) std = 0.109
  assert augment.sample_mixup_lambda(np.random.default_rng(7), alpha=10.0) == draws[7]
  assert np.std([augment.sample_mixup_lambda(np.random.default_rng(s), 0.5)
                 for s in range(400)]) > 0.25


# ---- SpecAugment --------------------------------------------------------------------


def _mask_runs(zeroed):
  """Returns (start, width) of the one contiguous run of True (width 0 if none)."""
  idx = np.flatnonzero(zeroed)
  if idx.size == 0:
    return 0, 0
  assert np.all(np.diff(idx) == 1), "mask is not contiguous"
  return int(idx[0]), int(idx.size)


def test_spec_augment_masks_follow_torchaudio_bounds():
  frames, bins, freqm, timem = 100, 64, 24, 48
  spec = jnp.ones((16, 8, frames, bins))
  masked = np.asarray(jax.jit(augment.spec_augment, static_argnums=(2, 3))(
      spec, jax.random.key(0), freqm, timem))
  assert masked.shape == spec.shape
  masked = masked.reshape(-1, frames, bins)
  freq_masks, time_masks = [], []
  for sample in masked:
    zero = sample == 0.0
    assert np.all(sample[~zero] == 1.0)
    time_start, time_width = _mask_runs(zero.all(axis=1))
    freq_start, freq_width = _mask_runs(zero.all(axis=0))
    expected = np.zeros_like(zero)
    expected[time_start:time_start + time_width] = True
    expected[:, freq_start:freq_start + freq_width] = True
    np.testing.assert_array_equal(zero, expected)  # exactly one band per axis
    assert time_width < timem and freq_width < freqm
    assert time_start + time_width <= frames and freq_start + freq_width <= bins
    freq_masks.append((freq_start, freq_width))
    time_masks.append((time_start, time_width))
  assert len(set(freq_masks)) > 100 and len(set(time_masks)) > 100
  assert max(w for _, w in freq_masks) >= freqm - 3
  assert max(w for _, w in time_masks) >= timem - 5
  assert max(s + w for s, w in time_masks) >= frames - 5  # masks reach the end
  assert min(s for s, w in time_masks if w) <= 3


def test_spec_augment_single_axis_and_disabled():
  spec = jnp.ones((4, 50, 32))
  key = jax.random.key(3)
  for off in (0, -1):
    np.testing.assert_array_equal(np.asarray(augment.spec_augment(spec, key, off, off)),
                                  np.asarray(spec))
  only_freq = np.asarray(augment.spec_augment(spec, key, 10, 0))
  assert np.all((only_freq == 0).all(axis=1) == (only_freq == 0).any(axis=1))
  only_time = np.asarray(augment.spec_augment(spec, key, 0, 20))
  assert np.all((only_time == 0).all(axis=2) == (only_time == 0).any(axis=2))
  single = augment.spec_augment(spec[0], key, 10, 20)
  assert single.shape == (50, 32)


def test_features_mask_before_normalisation():
  target = 48
  waves, valid = zip(*(audio.pad_or_crop(
      np.random.default_rng(s).standard_normal(8000).astype(np.float32) * 0.1, target)
      for s in range(6)))
  waves, valid = np.stack(waves), np.array(valid)
  run = jax.jit(functools.partial(
      audio.features, num_mel_bins=64, target_length=target, mean=MEAN, std=STD,
      freqm=16, timem=24))
  plain = np.asarray(run(waves, valid))
  masked = np.asarray(run(waves, valid, rng=jax.random.key(1)))
  changed = plain != masked
  assert changed.any()
  np.testing.assert_allclose(masked[changed], -MEAN / (2 * STD), rtol=1e-6)
  patterns = {changed[i].tobytes() for i in range(len(waves))}
  assert len(patterns) == len(waves)  # each clip gets its own masks
