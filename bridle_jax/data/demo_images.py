"""Bundled image demo data: a deterministic generator of labelled synthetic pictures.

`write_demo_images` writes a small corpus in the layout the image config reads: PNG
files under `images/`, `train.json` / `eval.json` manifests whose entries name their file
"image", and a `class_labels_indices.csv`. Every picture holds one pattern of one class
(stripes, checks, rings, shapes) with random colours, position, size, period and
orientation jitter over a noisy colour gradient, at a random size between 56 and 96
pixels, so the classes are learnable from pixels but not trivially.

  python -m bridle_jax.data.demo_images --out_dir DIR [--images_per_class N] [--seed S]
"""
import argparse
import io
import os
import zlib
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from bridle_jax import files
from bridle_jax.data import demo

GENERATOR_VERSION = 1
IMAGE_DIR_NAME = "images"
MIN_SIDE, MAX_SIDE = 56, 96


class PictureClass(NamedTuple):
  mid: str
  display_name: str
  draw: Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]
  texture: bool  # a texture fills a square patch; a shape is drawn whole


# Each `draw(u, v, size, rng)` gets pattern coordinates centred on the pattern and
# rotated by a small random angle, in pixels, and returns a [0, 1] coverage mask.

def _stripes(u, v, size, rng):
  period = rng.uniform(0.15, 0.3) * size
  return (np.sin(2 * np.pi * v / period) > 0).astype(np.float32)


def _columns(u, v, size, rng):
  return _stripes(v, u, size, rng)


def _checks(u, v, size, rng):
  period = rng.uniform(0.2, 0.35) * size
  return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)


def _rings(u, v, size, rng):
  period = rng.uniform(0.12, 0.22) * size
  return (np.sin(2 * np.pi * np.hypot(u, v) / period) > 0).astype(np.float32)


def _disc(u, v, size, rng):
  return (np.hypot(u, v) < size / 2).astype(np.float32)


def _square(u, v, size, rng):
  return (np.maximum(np.abs(u), np.abs(v)) < size / 2).astype(np.float32)


def _cross(u, v, size, rng):
  arm = rng.uniform(0.12, 0.2) * size
  inside = np.maximum(np.abs(u), np.abs(v)) < size / 2
  return (inside & ((np.abs(u) < arm) | (np.abs(v) < arm))).astype(np.float32)


def _triangle(u, v, size, rng):
  half = size / 2
  return ((v < half) & (v > -half) & (np.abs(u) < (v + half) / 2)).astype(np.float32)


CLASSES = (
    PictureClass("/demo/stripes", "Horizontal stripes", _stripes, True),
    PictureClass("/demo/columns", "Vertical stripes", _columns, True),
    PictureClass("/demo/checks", "Checkerboard", _checks, True),
    PictureClass("/demo/rings", "Concentric rings", _rings, True),
    PictureClass("/demo/disc", "Disc", _disc, False),
    PictureClass("/demo/square", "Square", _square, False),
    PictureClass("/demo/cross", "Cross", _cross, False),
    PictureClass("/demo/triangle", "Triangle", _triangle, False),
)


def picture_rng(seed: int, split: str, mid: str, index: int) -> np.random.Generator:
  """The generator of one picture: a function of its identity only."""
  return np.random.default_rng([seed, 1 + demo.SPLITS.index(split), zlib.crc32(mid.encode()),
                                index])


def synthesize_picture(picture_class: PictureClass, rng: np.random.Generator) -> np.ndarray:
  """One (height, width, 3) uint8 picture of the class's pattern."""
  height, width = (int(x) for x in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
  rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
  low, high = rng.uniform(0, 1, size=(2, 3))
  ramp = (rows / height)[..., None] if rng.random() < 0.5 else (cols / width)[..., None]
  picture = low * (1 - ramp) + high * ramp
  size = rng.uniform(0.45, 0.8) * min(height, width)
  centre_r = rng.uniform(size / 2, height - size / 2)
  centre_c = rng.uniform(size / 2, width - size / 2)
  angle = rng.uniform(-0.3, 0.3)
  dr, dc = rows - centre_r, cols - centre_c
  u = np.cos(angle) * dc + np.sin(angle) * dr
  v = -np.sin(angle) * dc + np.cos(angle) * dr
  coverage = picture_class.draw(u, v, size, rng)
  if picture_class.texture:
    coverage *= (np.maximum(np.abs(u), np.abs(v)) < size / 2)
  colour = rng.uniform(0, 1, size=3)
  picture = picture * (1 - coverage[..., None]) + colour * coverage[..., None]
  picture += rng.normal(0, rng.uniform(0.02, 0.08), size=picture.shape)
  return (np.clip(picture, 0, 1) * 255).round().astype(np.uint8)


def _png_bytes(picture: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(picture).save(buffer, format="PNG")
  return buffer.getvalue()


def write_demo_images(out_dir: str, images_per_class: int = 40, eval_images_per_class: int = 10,
                      seed: int = 0) -> dict:
  """Writes the corpus into `out_dir` unless an identical complete one is there.

  Returns {'train', 'eval'} (manifest paths), 'label_csv' and 'image_dir'. The same
  arguments give byte-identical files; the stamp is written last and removed first, so
  a corpus is reused only when a previous run finished it.
  """
  if images_per_class < 1 or eval_images_per_class < 1 or seed < 0:
    raise ValueError("images_per_class and eval_images_per_class must be positive, seed >= 0")
  out_dir = os.path.abspath(out_dir)
  image_dir = os.path.join(out_dir, IMAGE_DIR_NAME)
  paths = {split: os.path.join(out_dir, f"{split}.json") for split in demo.SPLITS}
  paths.update(label_csv=os.path.join(out_dir, demo.LABEL_CSV_NAME), image_dir=image_dir)
  stamp = dict(version=GENERATOR_VERSION, kind="images", images_per_class=images_per_class,
               eval_images_per_class=eval_images_per_class, seed=seed)
  if demo.is_complete(out_dir, paths, stamp, file_key="image"):
    return paths

  os.makedirs(image_dir, exist_ok=True)
  stamp_path = os.path.join(out_dir, demo.STAMP_NAME)
  if os.path.exists(stamp_path):
    os.remove(stamp_path)
  counts = dict(train=images_per_class, eval=eval_images_per_class)
  for split in demo.SPLITS:
    entries = []
    for picture_class in CLASSES:
      name = picture_class.mid.rsplit("/", 1)[-1]
      for index in range(counts[split]):
        picture = synthesize_picture(picture_class, picture_rng(seed, split, picture_class.mid,
                                                                index))
        file_name = f"{split}_{name}_{index:04d}.png"
        files.write_atomic(os.path.join(image_dir, file_name), _png_bytes(picture))
        entries.append({"image": f"{IMAGE_DIR_NAME}/{file_name}", "labels": picture_class.mid,
                        "fold": index % demo.NUM_FOLDS + 1})
    files.write_atomic(paths[split], demo.json_bytes({"data": entries}))
  files.write_atomic(paths["label_csv"], demo.label_csv_bytes(CLASSES))
  files.write_atomic(stamp_path, demo.json_bytes(stamp))
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--images_per_class", type=int, default=40)
  parser.add_argument("--eval_images_per_class", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  paths = write_demo_images(**vars(args))
  print(f"Demo images: {len(CLASSES)} classes, {args.images_per_class} train and "
        f"{args.eval_images_per_class} eval images per class")
  for key, path in paths.items():
    print(f"  {key}: {path}")


if __name__ == "__main__":
  main()
