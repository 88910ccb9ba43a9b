"""What each input modality (`data.modality`) means for the rest of the program.

audio: batches hold 'waveform' (B, samples) float32 and 'valid_frames' (B,); the device
  computes the (target_length, num_mel_bins) fbank. Patches tile (time, freq).
image: batches hold 'image' (B, image_size, image_size, 3) uint8; the device scales and
  normalises it. Patches tile (rows, cols).
Everything else (models, steps, checkpoints, export) sees only `input_shape` and
`features`.
"""
import functools
from typing import Any, Callable

import numpy as np

from bridle_jax.data import audio
from bridle_jax.data import augment
from bridle_jax.data import image

MODALITIES = ("audio", "image")
DecodeError = (audio.AudioDecodeError, image.ImageDecodeError)
# File suffixes a class folder is searched for.
EXTENSIONS = {"audio": (".wav", ".flac"),
              "image": (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                        ".webp")}  # torchvision ImageFolder's
# Data fields each modality needs (a config of the other kind lacks them).
REQUIRED_FIELDS = {"audio": ("sample_rate", "num_mel_bins", "target_length"),
                   "image": ("image_size", "crop_scale", "crop_ratio", "hflip")}
# The JSON manifest entry field that holds a record's file.
MANIFEST_FILE_KEY = {"audio": "wav", "image": "image"}


def modality(data_config) -> str:
  """`data.modality`, 'audio' for configs written before it existed."""
  name = data_config.get("modality", "audio")
  if name not in MODALITIES:
    raise ValueError(f"data.modality: {name!r} is not one of {', '.join(map(repr, MODALITIES))}")
  return name


def input_shape(data_config) -> tuple[int, ...]:
  """The model's input per example: (frames, mel bins) or (size, size, 3)."""
  if modality(data_config) == "image":
    return (data_config.image_size, data_config.image_size, 3)
  return (data_config.target_length, data_config.num_mel_bins)


def patch_grid(data_config, patch_size: int) -> tuple[int, int]:
  """(rows, cols) of patches: (time, freq) for audio, (height, width) for images."""
  rows, cols = input_shape(data_config)[:2]
  return rows // patch_size, cols // patch_size


def batch_keys(data_config) -> tuple[str, ...]:
  """The arrays of a batch that go to the device."""
  return ("image",) if modality(data_config) == "image" else ("waveform", "valid_frames")


def device_features(data_config) -> Callable[[dict, Any], Any]:
  """(batch, rng or None) -> model input; rng drives on-device augmentation (SpecAugment,
  random erasing)."""
  d = data_config
  if modality(d) == "image":
    reprob = d.get("reprob", 0.0)

    def image_features(batch, rng):
      x = image.features(batch["image"], mean=tuple(d.mean), std=tuple(d.std))
      return x if rng is None or reprob == 0 else augment.random_erasing(x, rng, reprob)
    return image_features
  front_end = functools.partial(
      audio.features, num_mel_bins=d.num_mel_bins, target_length=d.target_length,
      mean=d.mean, std=d.std, freqm=d.get("freqm", 0), timem=d.get("timem", 0),
      sample_rate=d.sample_rate)
  return lambda batch, rng: front_end(batch["waveform"], batch["valid_frames"], rng=rng)


def load_plain(record: dict, data_config) -> dict:
  """One record decoded without augmentation (evaluation, embeddings); raises DecodeError."""
  d = data_config
  encoded = record["audio"] or record["path"]
  if modality(d) == "image":
    return {"image": image.eval_crop(image.load_image(encoded, name=record["path"]),
                                     d.image_size)}
  wave = audio.load_audio(encoded, d.sample_rate, name=record["path"],
                          max_seconds=d.get("max_clip_seconds", 0.0))
  wave, valid = audio.pad_or_crop(wave, d.target_length, d.sample_rate)
  return {"waveform": wave, "valid_frames": np.int32(valid)}


def blank(data_config) -> dict:
  """An all-zero example (padding, and the row of a record that could not be read)."""
  d = data_config
  if modality(d) == "image":
    return {"image": np.zeros(input_shape(d), np.uint8)}
  samples = audio.num_samples_for_frames(d.target_length, d.sample_rate)
  return {"waveform": np.zeros(samples, np.float32), "valid_frames": np.int32(0)}


def stack(examples: list[dict]) -> dict:
  """Examples with the same keys -> one batch dict of stacked arrays."""
  return {key: np.stack([np.asarray(ex[key]) for ex in examples]) for key in examples[0]}


def batch_shapes(data_config, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{name: (shape, dtype)} of a batch's device arrays."""
  if modality(data_config) == "image":
    return {"image": ((batch_size, *input_shape(data_config)), np.uint8)}
  samples = audio.num_samples_for_frames(data_config.target_length, data_config.sample_rate)
  return {"waveform": ((batch_size, samples), np.float32),
          "valid_frames": ((batch_size,), np.int32)}


def random_batch(data_config, batch_size: int, rng: np.random.Generator) -> dict:
  """A batch of random input (benchmarks): noise waveforms of full length, or noise images."""
  if modality(data_config) == "image":
    return {"image": rng.integers(0, 256, size=(batch_size, *input_shape(data_config)),
                                  dtype=np.uint8)}
  (shape, dtype), _ = batch_shapes(data_config, batch_size).values()
  return {"waveform": (0.1 * rng.standard_normal(shape)).astype(dtype),
          "valid_frames": np.full((batch_size,), data_config.target_length, np.int32)}
