"""Bundled demo data: a deterministic generator of labelled synthetic sound events.

`write_demo_corpus` writes a small corpus in the same layout as real data: 16-bit mono
wav files under `audio/`, AudioMAE/AST-style `train.json` / `eval.json` manifests and an
AudioSet-style `class_labels_indices.csv`. Every clip holds one event of one class with
randomised pitch, rate, onset, duration and level over coloured background noise at a
random SNR, so the classes are learnable from log-mel spectrograms but not trivially.

  python -m bridle_jax.data.demo --out_dir DIR [--clips_per_class N] [--seed S]
"""
import argparse
import csv
import io
import json
import os
import zlib
from typing import Callable, NamedTuple

import numpy as np
import soundfile as sf

from bridle_jax import files

# Bump when the synthesis changes so corpora stamped by an older generator get rewritten.
GENERATOR_VERSION = 1
# Events end within this many seconds: the demo config reads 128 fbank frames (1.28 s).
VISIBLE_SECONDS = 1.28
NUM_FOLDS = 5
STAMP_NAME = "demo_corpus.json"
LABEL_CSV_NAME = "class_labels_indices.csv"
AUDIO_DIR_NAME = "audio"
SPLITS = ("train", "eval")
MIN_SAMPLE_RATE = 16000
MIN_CLIP_SECONDS = 0.25
MAX_FREQ_HZ = 7000.0  # no component reaches above this


class SoundClass(NamedTuple):
  mid: str
  display_name: str
  synthesize: Callable[[np.random.Generator, int, int], np.ndarray]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
  return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _times(n: int, sample_rate: int) -> np.ndarray:
  return np.arange(n) / sample_rate


def _sine_from_freq(freq: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
  """Sinusoid following an instantaneous frequency track (Hz per sample), random phase."""
  phase = 2 * np.pi * np.cumsum(freq) / sample_rate + rng.uniform(0, 2 * np.pi)
  return np.sin(phase)


def _bandpass_noise(rng: np.random.Generator, n: int, sample_rate: int, low: float,
                    high: float) -> np.ndarray:
  """White noise restricted to [low, high] Hz with raised-cosine band edges."""
  spectrum = np.fft.rfft(rng.standard_normal(n))
  freqs = np.fft.rfftfreq(n, 1 / sample_rate)
  edge = 0.1 * (high - low)
  rise = np.clip((freqs - (low - edge)) / edge, 0, 1)
  fall = np.clip(((high + edge) - freqs) / edge, 0, 1)
  mask = np.sin(0.5 * np.pi * np.minimum(rise, fall)) ** 2
  return np.fft.irfft(spectrum * mask, n)


def _steady_tone(rng, n, sample_rate):
  freq = _log_uniform(rng, 250, 4000)
  return _sine_from_freq(np.full(n, freq), sample_rate, rng)


def _chirp_track(rng, n, sample_rate):
  """Exponential sweep from 200-800 Hz up by 1.5-3 octaves."""
  start = _log_uniform(rng, 200, 800)
  end = start * 2 ** rng.uniform(1.5, 3.0)
  return start * (end / start) ** np.linspace(0, 1, n)


def _upward_chirp(rng, n, sample_rate):
  return _sine_from_freq(_chirp_track(rng, n, sample_rate), sample_rate, rng)


def _downward_chirp(rng, n, sample_rate):
  return _sine_from_freq(_chirp_track(rng, n, sample_rate)[::-1], sample_rate, rng)


def _noise_burst(rng, n, sample_rate):
  center = _log_uniform(rng, 500, 4000)
  half_width = 2 ** (rng.uniform(0.3, 1.0) / 2)
  return _bandpass_noise(rng, n, sample_rate, center / half_width, center * half_width)


def _click_train(rng, n, sample_rate):
  """Short decaying broadband clicks at 5-20 Hz with slight timing jitter."""
  period = sample_rate / rng.uniform(5, 20)
  click_len = int(0.004 * sample_rate)
  click = rng.standard_normal(click_len) * np.exp(-np.arange(click_len) / (0.2 * click_len))
  out = np.zeros(n)
  position = rng.uniform(0, 0.5) * min(period, n - click_len)
  while position + click_len < n:
    start = int(position)
    out[start:start + click_len] += click
    position += period * rng.uniform(0.95, 1.05)
  return out


def _harmonic_stack(rng, n, sample_rate):
  f0 = _log_uniform(rng, 100, 400)
  num_harmonics = int(rng.integers(5, 13))
  rolloff = rng.uniform(0.5, 1.5)
  out = np.zeros(n)
  for k in range(1, num_harmonics + 1):
    out += k ** -rolloff * _sine_from_freq(np.full(n, k * f0), sample_rate, rng)
  return out


def _am_tone(rng, n, sample_rate):
  carrier = _sine_from_freq(np.full(n, _log_uniform(rng, 300, 3000)), sample_rate, rng)
  rate, depth = rng.uniform(4, 12), rng.uniform(0.7, 1.0)
  phase = 2 * np.pi * rate * _times(n, sample_rate) + rng.uniform(0, 2 * np.pi)
  return carrier * (1 - depth * (0.5 - 0.5 * np.cos(phase)))


def _fm_tone(rng, n, sample_rate):
  center = _log_uniform(rng, 400, 3000)
  rate, depth = rng.uniform(4, 9), rng.uniform(0.04, 0.1)
  phase = 2 * np.pi * rate * _times(n, sample_rate) + rng.uniform(0, 2 * np.pi)
  return _sine_from_freq(center * (1 + depth * np.sin(phase)), sample_rate, rng)


def _two_tone_siren(rng, n, sample_rate):
  """Alternation between two pitches a third to a fifth apart, 1.5-4 switches per second."""
  low = _log_uniform(rng, 400, 2500)
  high = low * rng.uniform(1.2, 1.5)
  rate = rng.uniform(1.5, 4)
  phase = 2 * np.pi * rate * _times(n, sample_rate) + rng.uniform(0, 2 * np.pi)
  step = 0.5 + 0.5 * np.tanh(8 * np.sin(phase))
  return _sine_from_freq(low + (high - low) * step, sample_rate, rng)


def _impact(rng, n, sample_rate):
  """Struck bar: inharmonic partials (free-bar mode ratios) with exponential decays."""
  base = _log_uniform(rng, 300, 1500)
  decay_s = rng.uniform(0.08, 0.3)
  t = _times(n, sample_rate)
  out = np.zeros(n)
  for k, ratio in enumerate((1.0, 2.76, 5.40, 8.93)):
    if base * ratio < MAX_FREQ_HZ:
      envelope = np.exp(-t * (k + 1) / decay_s)
      out += rng.uniform(0.3, 1.0) * envelope * _sine_from_freq(np.full(n, base * ratio),
                                                               sample_rate, rng)
  return out


CLASSES = (
    SoundClass("/demo/steady_tone", "Steady tone", _steady_tone),
    SoundClass("/demo/upward_chirp", "Upward chirp", _upward_chirp),
    SoundClass("/demo/downward_chirp", "Downward chirp", _downward_chirp),
    SoundClass("/demo/noise_burst", "Noise burst, band-limited", _noise_burst),
    SoundClass("/demo/click_train", "Click train", _click_train),
    SoundClass("/demo/harmonic_stack", "Harmonic stack", _harmonic_stack),
    SoundClass("/demo/am_tone", "Amplitude-modulated tone", _am_tone),
    SoundClass("/demo/fm_tone", "FM tone, vibrato", _fm_tone),
    SoundClass("/demo/two_tone_siren", "Two-tone siren", _two_tone_siren),
    SoundClass("/demo/impact", "Impact, struck bar", _impact),
)


def _fade(n: int, ramp: int) -> np.ndarray:
  """Unit envelope with raised-cosine ramps of `ramp` samples at both ends."""
  envelope = np.ones(n)
  ramp = min(ramp, n // 2)
  rise = np.sin(0.5 * np.pi * np.arange(ramp) / ramp) ** 2
  envelope[:ramp] = rise
  envelope[n - ramp:] = rise[::-1]
  return envelope


def _background_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """Unit-RMS noise with a random spectral tilt between white and beyond pink."""
  spectrum = np.fft.rfft(rng.standard_normal(n))
  tilt = rng.uniform(0.0, 1.5)
  spectrum *= np.arange(1, len(spectrum) + 1) ** (-tilt / 2)
  noise = np.fft.irfft(spectrum, n)
  return noise / np.sqrt(np.mean(noise ** 2))


def clip_rng(seed: int, split: str, mid: str, index: int) -> np.random.Generator:
  """The generator of one clip: a function of its identity only, not of generation order."""
  return np.random.default_rng([seed, SPLITS.index(split), zlib.crc32(mid.encode()), index])


def synthesize_clip(sound_class: SoundClass, rng: np.random.Generator, num_samples: int,
                    sample_rate: int) -> np.ndarray:
  """One float32 clip: the class's event at a random onset, duration, SNR and peak level."""
  window = min(num_samples, int(VISIBLE_SECONDS * sample_rate))
  event_len = int(rng.uniform(0.4, 0.7) * window)
  onset = int(rng.integers(0, window - event_len + 1))
  event = sound_class.synthesize(rng, event_len, sample_rate)
  event = event * _fade(event_len, int(rng.uniform(0.005, 0.02) * sample_rate))
  event /= np.sqrt(np.mean(event ** 2))
  snr_db = rng.uniform(6, 30)
  clip = _background_noise(rng, num_samples) * 10 ** (-snr_db / 20)
  clip[onset:onset + event_len] += event
  peak_dbfs = rng.uniform(-30, -6)
  return (clip * (10 ** (peak_dbfs / 20) / np.max(np.abs(clip)))).astype(np.float32)


def _wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
  buffer = io.BytesIO()
  sf.write(buffer, wave, sample_rate, subtype="PCM_16", format="WAV")
  return buffer.getvalue()


def label_csv_bytes(classes) -> bytes:
  """An AudioSet-style class csv of classes with `mid` and `display_name`."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(("index", "mid", "display_name"))
  for index, cls in enumerate(classes):
    writer.writerow((index, cls.mid, cls.display_name))
  return buffer.getvalue().encode()


def json_bytes(obj) -> bytes:
  return (json.dumps(obj, indent=1) + "\n").encode()


def is_complete(out_dir: str, paths: dict, stamp: dict, file_key: str = "wav") -> bool:
  """True when `out_dir` holds the stamp for these arguments and every file it names."""
  try:
    with open(os.path.join(out_dir, STAMP_NAME)) as f:
      if json.load(f) != stamp:
        return False
    for split in SPLITS:
      with open(paths[split]) as f:
        entries = json.load(f)["data"]
      if not all(os.path.isfile(os.path.join(out_dir, e[file_key])) for e in entries):
        return False
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return os.path.isfile(paths["label_csv"])


def write_demo_corpus(out_dir: str, clips_per_class: int = 40, eval_clips_per_class: int = 10,
                      clip_seconds: float = 1.5, sample_rate: int = 16000,
                      seed: int = 0) -> dict:
  """Writes the demo corpus into `out_dir` unless an identical complete one is there.

  Returns {'train', 'eval'} (manifest paths), 'label_csv' and 'audio_dir'. The same
  arguments give byte-identical files. The stamp `demo_corpus.json` is written last and
  removed first, so a corpus is reused only when a previous run finished it.
  """
  if clips_per_class < 1 or eval_clips_per_class < 1:
    raise ValueError("clips_per_class and eval_clips_per_class must be positive")
  if clip_seconds < MIN_CLIP_SECONDS or sample_rate < MIN_SAMPLE_RATE or seed < 0:
    raise ValueError(f"need clip_seconds >= {MIN_CLIP_SECONDS}, sample_rate >= "
                     f"{MIN_SAMPLE_RATE} and seed >= 0")
  out_dir = os.path.abspath(out_dir)
  audio_dir = os.path.join(out_dir, AUDIO_DIR_NAME)
  paths = {split: os.path.join(out_dir, f"{split}.json") for split in SPLITS}
  paths.update(label_csv=os.path.join(out_dir, LABEL_CSV_NAME), audio_dir=audio_dir)
  stamp = dict(version=GENERATOR_VERSION, clips_per_class=clips_per_class,
               eval_clips_per_class=eval_clips_per_class, clip_seconds=clip_seconds,
               sample_rate=sample_rate, seed=seed)
  if is_complete(out_dir, paths, stamp):
    return paths

  os.makedirs(audio_dir, exist_ok=True)
  stamp_path = os.path.join(out_dir, STAMP_NAME)
  if os.path.exists(stamp_path):
    os.remove(stamp_path)
  num_samples = int(round(clip_seconds * sample_rate))
  counts = dict(train=clips_per_class, eval=eval_clips_per_class)
  for split in SPLITS:
    entries = []
    for sound_class in CLASSES:
      name = sound_class.mid.rsplit("/", 1)[-1]
      for index in range(counts[split]):
        rng = clip_rng(seed, split, sound_class.mid, index)
        wave = synthesize_clip(sound_class, rng, num_samples, sample_rate)
        wav_name = f"{split}_{name}_{index:04d}.wav"
        files.write_atomic(os.path.join(audio_dir, wav_name), _wav_bytes(wave, sample_rate))
        entries.append({"wav": f"{AUDIO_DIR_NAME}/{wav_name}", "labels": sound_class.mid,
                        "fold": index % NUM_FOLDS + 1})
    files.write_atomic(paths[split], json_bytes({"data": entries}))
  files.write_atomic(paths["label_csv"], label_csv_bytes(CLASSES))
  files.write_atomic(stamp_path, json_bytes(stamp))
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--clips_per_class", type=int, default=40)
  parser.add_argument("--eval_clips_per_class", type=int, default=10)
  parser.add_argument("--clip_seconds", type=float, default=1.5)
  parser.add_argument("--sample_rate", type=int, default=16000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  paths = write_demo_corpus(**vars(args))
  print(f"Demo corpus: {len(CLASSES)} classes, {args.clips_per_class} train and "
        f"{args.eval_clips_per_class} eval clips per class")
  for key, path in paths.items():
    print(f"  {key}: {path}")


if __name__ == "__main__":
  main()
