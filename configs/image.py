"""Image BRIDLE pretraining: ViT-B/16 on 224x224 RGB (the reference's ImageNet-1K recipe).

Usage:
  python -m bridle_jax.main --config=configs/image.py --workdir=DIR \
      --config.data.manifest=/data/imagenet/train      # class folders root/<class>/<image>
  python -m bridle_jax.main --config=configs/image.py:demo --workdir=DIR   # 2-core CPU demo

Data: a class-folder tree (data.format="folder", ImageFolder's layout; labels are only
used by evaluations) or a JSON manifest whose entries name their file "image"
(data.format="json" with data.label_csv). Pretraining input: random resized crop to 224
(scale 0.2-1, ratio 3/4-4/3, bicubic), random horizontal flip, ImageNet mean/std.
Model as the reference's image path: in_chans 3, 14x14 patches with the MAE sin-cos table
(model.pos_grid="time_freq" is that table on the image's rows and columns), mask 0.8, and
decoder mode 0 (16 global blocks of width 512 with CLS kept), which the reference uses for
images whatever its decoder flag. Schedules of its launch scripts: encoder 200 epochs (10
warmup) at 5e-4, tokenizer 50 epochs (2 warmup) at 2e-4, global batch 1024. Everything
else (quantizer, rounds, devices, checkpoints) is the audio recipe's.
"""
import ml_collections

from bridle_jax import config_files
from bridle_jax.data import image

audio_config = config_files.sibling(__file__, "audio")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the image recipe; `arg == "demo"` gives the small CPU variant."""
  if arg not in ("", "demo"):
    raise ValueError(f"configs/image.py: unknown variant {arg!r} (known: demo)")
  c = audio_config.get_config()
  c.data = d = ml_collections.ConfigDict()
  d.modality = "image"
  d.format = "folder"          # folder | json
  d.manifest = ""              # class folder root, or json manifest
  d.label_csv = ""             # class_labels_indices.csv (json format)
  d.demo_dir = ""              # when set, a demo image corpus is generated there first
  # Paths may contain "{workdir}"; other relative paths resolve against the current dir.
  d.image_size = 224
  d.mean = image.IMAGENET_MEAN
  d.std = image.IMAGENET_STD
  d.crop_scale = (0.2, 1.0)    # random resized crop: fraction of the image's area
  d.crop_ratio = (3 / 4, 4 / 3)  # and aspect ratio range
  d.hflip = True
  d.randaugment = ""           # e.g. "rand-m9-mstd0.5-inc1" (fine-tuning); "" = none
  d.reprob = 0.0               # random erasing probability (fine-tuning: 0.25)
  d.num_workers = -1           # grain worker processes (-1: one per core less one, at most 16)
  d.prefetch = 2               # batches decoded ahead by each worker (or in-process)
  d.multi_label = False

  m = c.model
  m.in_chans = 3
  m.pos_grid = "time_freq"
  m.decoder.mode = 0
  c.encoder_phase.update(epochs=200, warmup_epochs=10, lr=5e-4, batch_size=1024)
  c.tokenizer_phase.update(epochs=50, warmup_epochs=2, lr=2e-4, batch_size=1024)
  if arg == "demo":
    _shrink_for_demo(c)
  return c


def _shrink_for_demo(c: ml_collections.ConfigDict) -> None:
  """Tiny model and 64x64 images so all rounds run on a 2-core CPU in minutes."""
  c.data.format = "json"
  c.data.demo_dir = "{workdir}/demo_images"
  c.data.manifest = "{workdir}/demo_images/train.json"
  c.data.label_csv = "{workdir}/demo_images/class_labels_indices.csv"
  c.data.image_size = 64
  c.data.num_workers = 0
  audio_config.shrink_training_for_demo(c)
  c.model.patch_size = 8
