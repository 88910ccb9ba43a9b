"""Audio front end: decoding and resampling on the host, Kaldi fbank on the device.

The host side (`load_audio`, `pad_or_crop`) turns an encoded file into a fixed-length
16 kHz waveform plus the number of fbank frames that come from real audio. The device
side (`fbank`, `features`) reproduces `torchaudio.compliance.kaldi.fbank` as the
reference calls it (25 ms Hanning frames every 10 ms, snip_edges, no dither, power
spectrum, log mel with Kaldi's 1127 ln(1 + f/700) scale), then pads, masks and
normalises exactly as the reference does.
"""
import functools
import io
import math
import os
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import soundfile as sf
import soxr

from bridle_jax.data import augment

FRAME_LENGTH_MS = 25
FRAME_SHIFT_MS = 10
PREEMPHASIS = 0.97
LOG_FLOOR = float(np.finfo(np.float32).eps)  # 1.1920929e-07, Kaldi's log floor.


class AudioDecodeError(ValueError):
  """A clip could not be turned into a usable waveform."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"{name}: {reason}")
    self.name = name
    self.reason = reason


def frame_length(sample_rate: int = 16000) -> int:
  """Samples per analysis frame (Kaldi truncates 25 ms to an integer)."""
  return sample_rate * FRAME_LENGTH_MS // 1000


def frame_shift(sample_rate: int = 16000) -> int:
  """Samples between frame starts (10 ms)."""
  return sample_rate * FRAME_SHIFT_MS // 1000


def fft_length(sample_rate: int = 16000) -> int:
  """FFT length: the frame length rounded up to a power of two."""
  return 1 << (frame_length(sample_rate) - 1).bit_length()


FRAME_LENGTH = frame_length(16000)
FRAME_SHIFT = frame_shift(16000)


def num_frames(num_samples: int, sample_rate: int = 16000) -> int:
  """Number of Kaldi frames (snip_edges=True) in `num_samples` samples."""
  length = frame_length(sample_rate)
  if num_samples < length:
    return 0
  return 1 + (num_samples - length) // frame_shift(sample_rate)


def num_samples_for_frames(frames: int, sample_rate: int = 16000) -> int:
  """Fewest samples that give exactly `frames` frames."""
  if frames <= 0:
    return 0
  return (frames - 1) * frame_shift(sample_rate) + frame_length(sample_rate)


# ------------------------------------------------------------------------------------
# Host side.


def load_audio(source: Union[str, os.PathLike, bytes], target_sr: int = 16000,
               name: Optional[str] = None, max_seconds: Optional[float] = None) -> np.ndarray:
  """Decodes a clip to a mono, DC-free float32 waveform at `target_sr`.

  Args:
    source: a path, or the raw bytes of an encoded file (wav, flac, anything
      libsndfile reads).
    target_sr: output sample rate; other rates are resampled with soxr 'HQ'.
    name: how errors refer to the clip; defaults to the path, or "<bytes>".
    max_seconds: decode at most this much from the start (bounds the work and memory
      of a very long clip; training crops to its target length anyway).

  Returns:
    (T,) float32 waveform; PCM input is scaled to [-1, 1].

  Raises:
    AudioDecodeError: the file is missing, not decodable, empty, or not finite.
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    name = name or "<bytes>"
    handle = io.BytesIO(bytes(source))
  else:
    name = name or os.fspath(source)
    if not os.path.isfile(source):
      raise AudioDecodeError(name, "file not found")
    handle = source
  try:
    with sf.SoundFile(handle) as f:
      sample_rate = f.samplerate
      frames = -1 if not max_seconds else int(math.ceil(max_seconds * sample_rate))
      data = f.read(frames=frames, dtype="float32", always_2d=True)
  except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
    reason = getattr(e, "error_string", None) or str(e)
    raise AudioDecodeError(name, f"cannot decode audio ({reason})") from e
  if data.size == 0:
    raise AudioDecodeError(name, "no audio samples")
  # Mono files (the common case) skip the channel mean; every step below works in
  # place on the decoded buffer, because each fresh clip-sized array costs page faults.
  waveform = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
  total = waveform.sum(dtype=np.float64)  # NaN or Inf anywhere makes it non-finite
  if not math.isfinite(total):
    raise AudioDecodeError(name, "non-finite (NaN or Inf) samples")
  if sample_rate != target_sr:
    waveform = soxr.resample(waveform, sample_rate, target_sr, quality="HQ")
    if waveform.size == 0:
      raise AudioDecodeError(name, f"too short to resample from {sample_rate} Hz")
    total = waveform.sum(dtype=np.float64)
  waveform -= np.float32(total / waveform.size)
  return waveform


def pad_or_crop(waveform: np.ndarray, target_frames: int,
                sample_rate: int = 16000) -> Tuple[np.ndarray, int]:
  """Fits a waveform to exactly `target_frames` fbank frames.

  Longer clips keep their first samples; shorter ones get zeros at the end. The
  returned count of frames made only of real audio lets the device zero the rest,
  which matches the reference's zero-padding of the fbank before normalisation.

  Returns:
    (num_samples_for_frames(target_frames),) float32 waveform, and valid_frames.
  """
  waveform = np.asarray(waveform, dtype=np.float32)
  length = num_samples_for_frames(target_frames, sample_rate)
  valid_frames = min(num_frames(waveform.shape[0], sample_rate), target_frames)
  if waveform.shape[0] >= length:
    return waveform[:length].copy(), valid_frames
  padded = np.zeros(length, dtype=np.float32)
  padded[:waveform.shape[0]] = waveform
  return padded, valid_frames


# ------------------------------------------------------------------------------------
# Device side (jax.numpy; jit with sample_rate / num_mel_bins / shapes static).


def _mel_scale(freq):
  return 1127.0 * np.log1p(np.asarray(freq, np.float64) / 700.0)


def mel_banks(num_mel_bins: int, sample_rate: int = 16000, fft_size: int = 512,
              low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
  """Kaldi's triangular mel filters as a (fft_size // 2 + 1, num_mel_bins) matrix.

  Triangles are evenly spaced on the 1127 ln(1 + f/700) mel scale between
  `low_freq` and `high_freq` (<= 0 means relative to Nyquist). As in Kaldi, only
  FFT bins 0 .. fft_size/2 - 1 are weighted; the Nyquist row is zero, so the matrix
  multiplies an rfft power spectrum directly. Narrow triangles that catch no FFT bin
  stay all-zero rather than raising (torchaudio accepts them, so the reference
  does too).
  """
  nyquist = 0.5 * sample_rate
  if high_freq <= 0.0:
    high_freq += nyquist
  if not 0.0 <= low_freq < high_freq <= nyquist:
    raise ValueError(f"mel_banks: need 0 <= low_freq < high_freq <= {nyquist}, got "
                     f"low_freq={low_freq}, high_freq={high_freq}")
  mel_low, mel_high = _mel_scale(low_freq), _mel_scale(high_freq)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  left = mel_low + delta * np.arange(num_mel_bins)
  center, right = left + delta, left + 2.0 * delta
  num_fft_bins = fft_size // 2
  bin_mel = _mel_scale(np.arange(num_fft_bins) * (sample_rate / fft_size))[:, None]
  rising = (bin_mel - left) / (center - left)
  falling = (right - bin_mel) / (right - center)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights = np.concatenate([weights, np.zeros((1, num_mel_bins))], axis=0)
  return weights.astype(np.float32)


def _hanning(length: int) -> np.ndarray:
  """Kaldi's symmetric "hanning" window 0.5 - 0.5 cos(2 pi n / (N - 1))."""
  n = np.arange(length, dtype=np.float64)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (length - 1))).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("sample_rate", "num_mel_bins"))
def fbank(waveform, sample_rate: int = 16000, num_mel_bins: int = 128) -> jax.Array:
  """Log-mel filterbank exactly as the reference's Kaldi fbank call.

  Jit-compiled (and inlined into callers' jit) so that host and device calls run the
  same fused float32 program; op-by-op execution rounds differently and moves
  log energies near the floor by up to ~1e-3.

  Args:
    waveform: (..., T) samples in [-1, 1]; any float dtype (computed in float32).
    sample_rate: sampling rate in Hz (static).
    num_mel_bins: number of mel bins (static).

  Returns:
    (..., num_frames(T), num_mel_bins) float32 log-mel energies.
  """
  waveform = jnp.asarray(waveform, jnp.float32)
  *batch, num_samples = waveform.shape
  frames_count = num_frames(num_samples, sample_rate)
  if frames_count == 0:
    return jnp.zeros((*batch, 0, num_mel_bins), jnp.float32)
  length, n_fft = frame_length(sample_rate), fft_length(sample_rate)
  starts = np.arange(frames_count) * frame_shift(sample_rate)
  frames = waveform[..., starts[:, None] + np.arange(length)]  # (..., F, length)
  frames = frames - frames.mean(axis=-1, keepdims=True)
  previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
  frames = (frames - PREEMPHASIS * previous) * _hanning(length)
  spectrum = jnp.fft.rfft(frames, n=n_fft, axis=-1)
  power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
  banks = mel_banks(num_mel_bins, sample_rate, n_fft)
  mel = jnp.matmul(power, banks, precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(mel, LOG_FLOOR))


def normalize(fbank_features, mean, std):
  """Reference normalisation (x - mean) / (2 std)."""
  return (fbank_features - mean) / (2.0 * std)


def features(waveforms, valid_frames, *, num_mel_bins: int, target_length: int,
             mean: float, std: float, freqm: int = 0, timem: int = 0,
             rng: Optional[jax.Array] = None, sample_rate: int = 16000) -> jax.Array:
  """On-device front end for a batch of `pad_or_crop` waveforms.

  fbank, zero frames at and after each clip's `valid_frames` (the reference pads the
  fbank with zeros), SpecAugment when `rng` is given, then normalisation.

  Args:
    waveforms: (B, num_samples_for_frames(target_length)) waveforms.
    valid_frames: (B,) int frames of real audio per clip (may be traced).
    num_mel_bins, target_length, freqm, timem, sample_rate: static settings.
    mean, std: dataset statistics for `normalize`.
    rng: PRNG key for SpecAugment; None disables it.

  Returns:
    (B, target_length, num_mel_bins) float32 normalised features.
  """
  expected = num_samples_for_frames(target_length, sample_rate)
  if waveforms.shape[-1] != expected:
    raise ValueError(f"features: waveforms have {waveforms.shape[-1]} samples, "
                     f"target_length={target_length} needs {expected}")
  spec = fbank(waveforms, sample_rate, num_mel_bins)
  real = jnp.arange(target_length) < jnp.asarray(valid_frames)[..., None]
  spec = jnp.where(real[..., None], spec, 0.0)
  if rng is not None and (freqm > 0 or timem > 0):
    spec = augment.spec_augment(spec, rng, freqm, timem)
  return normalize(spec, mean, std)
