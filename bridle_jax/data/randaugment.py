"""RandAugment as the reference's image fine-tuning uses it (timm's `rand-m9-mstd0.5-inc1`).

Per image: two operations drawn with replacement from the 15 "increasing" ones below, each
applied with probability 1/2 at a magnitude drawn from N(m, mstd) (mstd > 100: uniform on
[0, m]) and clipped to [0, 10].
Levels (magnitude / 10 = f): rotation 30 f degrees, shear 0.3 f, translation 0.45 f of the
image side (each with a random sign), posterize to 4 - int(4 f) bits, solarize above
256 - int(256 f), solarize-add int(110 f) below 128, colour / contrast / brightness /
sharpness factors 1 +- 0.9 f. Geometric operations resample bicubically and fill with the
dataset mean colour. Host side, on PIL images; `rng` is a NumPy Generator.
"""
import re
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
NUM_OPS = 2
OP_PROB = 0.5
ROTATE_DEGREES = 30.0
SHEAR = 0.3
TRANSLATE_FRACTION = 0.45
SOLARIZE_ADD_MAX = 110
SOLARIZE_ADD_THRESHOLD = 128
ENHANCE_RANGE = 0.9


def parse_policy(policy: str) -> tuple[float, float]:
  """(magnitude, magnitude std) of a timm-style 'rand-m9-mstd0.5-inc1' string.

  Only the increasing operation set (inc1) is built; other keys are refused. As in timm, an
  mstd above 100 means a magnitude drawn uniformly from [0, m] (returned as std = inf).
  """
  parts = policy.split("-")
  if parts[0] != "rand":
    raise ValueError(f"RandAugment policy {policy!r} must start with 'rand-'")
  magnitude, std, increasing = None, 0.0, False
  for part in parts[1:]:
    match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
    key, value = match.groups() if match else (None, None)
    if key == "m":
      magnitude = float(value)
    elif key == "mstd":
      std = float(value) if float(value) <= 100 else float("inf")
    elif key == "inc" and value == "1":
      increasing = True
    else:
      raise ValueError(f"RandAugment policy {policy!r}: unsupported part {part!r} "
                       "(known: m<magnitude>, mstd<std>, inc1)")
  if magnitude is None or not 0 <= magnitude <= MAX_LEVEL or not increasing:
    raise ValueError(f"RandAugment policy {policy!r}: needs m in [0, 10] and inc1")
  return magnitude, std


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(img, matrix, fill):
  return img.transform(img.size, Image.Transform.AFFINE, matrix,
                       resample=Image.Resampling.BICUBIC, fillcolor=fill)


def _rotate(img, f, rng, fill):
  return img.rotate(_signed(ROTATE_DEGREES * f, rng), resample=Image.Resampling.BICUBIC,
                    fillcolor=fill)


def _shear_x(img, f, rng, fill):
  return _affine(img, (1, _signed(SHEAR * f, rng), 0, 0, 1, 0), fill)


def _shear_y(img, f, rng, fill):
  return _affine(img, (1, 0, 0, _signed(SHEAR * f, rng), 1, 0), fill)


def _translate_x(img, f, rng, fill):
  return _affine(img, (1, 0, _signed(TRANSLATE_FRACTION * f, rng) * img.width, 0, 1, 0), fill)


def _translate_y(img, f, rng, fill):
  return _affine(img, (1, 0, 0, 0, 1, _signed(TRANSLATE_FRACTION * f, rng) * img.height), fill)


def _posterize(img, f, rng, fill):
  bits = 4 - int(f * 4)
  if bits <= 0:  # keeping no bit is black (Pillow >= 10 refuses 0 bits)
    return Image.new(img.mode, img.size)
  return ImageOps.posterize(img, bits)


def _solarize(img, f, rng, fill):
  return ImageOps.solarize(img, 256 - int(f * 256))


def _solarize_add(img, f, rng, fill):
  add = int(f * SOLARIZE_ADD_MAX)
  table = [min(255, i + add) if i < SOLARIZE_ADD_THRESHOLD else i for i in range(256)]
  return img.point(table * len(img.getbands()))


def _enhance(enhancer) -> Callable:
  def apply(img, f, rng, fill):
    return enhancer(img).enhance(1.0 + _signed(ENHANCE_RANGE * f, rng))
  return apply


OPS = {
    "AutoContrast": lambda img, f, rng, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, f, rng, fill: ImageOps.equalize(img),
    "Invert": lambda img, f, rng, fill: ImageOps.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


def fill_colour(mean) -> tuple[int, ...]:
  """The dataset mean as an RGB fill: round(255 x mean), at most 255."""
  return tuple(min(255, round(255 * m)) for m in mean)


def rand_augment(img: Image.Image, rng: np.random.Generator, magnitude: float, std: float,
                 fill: tuple[int, ...]) -> Image.Image:
  """Applies NUM_OPS operations drawn with replacement, each with probability OP_PROB."""
  names = list(OPS)
  for index in rng.integers(len(names), size=NUM_OPS):
    if rng.random() > OP_PROB:
      continue
    if std == float("inf"):
      level = rng.uniform(0.0, magnitude)
    else:
      level = rng.normal(magnitude, std) if std > 0 else magnitude
    img = OPS[names[index]](img, min(max(level, 0.0), MAX_LEVEL) / MAX_LEVEL, rng, fill)
  return img

