"""Image front end: decoding and cropping on the host, normalisation on the device.

The host side turns an encoded file (JPEG, PNG, ...) into a fixed-size uint8 RGB array:
for pretraining a random resized crop and a random horizontal flip (the reference's
RandomResizedCrop(224, scale (0.2, 1.0), bicubic) + RandomHorizontalFlip); for evaluation
a resize of the shorter side to size / 0.875 and a centre crop. Batches travel as uint8 (a
quarter of float32's bytes); `features` scales and normalises them on the device.
"""
import io
import math
import os
from typing import Union

import jax.numpy as jnp
import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # centre crop after resizing the shorter side to size / 0.875
CROP_ATTEMPTS = 10


class ImageDecodeError(ValueError):
  """An image could not be decoded."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"{name}: {reason}")
    self.name = name
    self.reason = reason


def load_image(source: Union[str, os.PathLike, bytes], name: str = "") -> Image.Image:
  """Decodes a file path or encoded bytes into an RGB PIL image (fully read)."""
  name = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
  try:
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
      rgb = img.convert("RGB")
  except FileNotFoundError:
    raise ImageDecodeError(name, "file not found") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageDecodeError(name, f"cannot decode image: {e}") from None
  if min(rgb.size) == 0:
    raise ImageDecodeError(name, "empty image")
  return rgb


def random_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: tuple[float, float] = (0.2, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(left, top, crop width, crop height) of a random resized crop.

  The crop covers a uniform fraction in `scale` of the image's area with a log-uniform
  aspect ratio in `ratio`; after CROP_ATTEMPTS draws that do not fit it falls back to
  the largest centred crop with the nearest allowed ratio (torchvision's rule).
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(CROP_ATTEMPTS):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_crop(img: Image.Image, size: int, rng: np.random.Generator,
               scale: tuple[float, float], ratio: tuple[float, float],
               hflip: bool) -> np.ndarray:
  """Random resized crop to (size, size), bicubic, then a flip with probability 1/2."""
  left, top, w, h = random_crop_box(img.width, img.height, rng, scale, ratio)
  crop = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
  array = np.asarray(crop, np.uint8)
  if hflip and rng.random() < 0.5:
    array = array[:, ::-1]
  return np.ascontiguousarray(array)


def eval_crop(img: Image.Image, size: int) -> np.ndarray:
  """Shorter side resized to size / 0.875 (bicubic), then the centred (size, size) crop,
  with torchvision's Resize + CenterCrop arithmetic (long side truncated, offset rounded)."""
  short = int(size / EVAL_CROP_FRACTION)
  if img.width <= img.height:
    width, height = short, int(short * img.height / img.width)
  else:
    width, height = int(short * img.width / img.height), short
  resized = img.resize((width, height), Image.Resampling.BICUBIC)
  left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
  return np.asarray(resized.crop((left, top, left + size, top + size)), np.uint8)


def features(images, *, mean, std):
  """uint8 (B, H, W, 3) -> float32 ((x / 255) - mean) / std per channel."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
