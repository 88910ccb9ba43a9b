"""Image linear-probe recipe of the reference (ImageNet-1K, BRIDLE §6.6), plus a CPU demo.

Usage:
  python -m bridle_jax.main --config=configs/finetune_image.py:in1k_probe \
      --config.init_from=PRETRAIN_WORKDIR --workdir=DIR \
      --config.data.manifest=/data/imagenet/train --config.data.eval_manifest=/data/imagenet/val
  python -m bridle_jax.main --config=configs/finetune_image.py:probe_demo \
      --config.init_from=IMAGE_DEMO_WORKDIR --workdir=DIR       # 2-core CPU

Variants: in1k_probe (the reference's submit_lp_img.sh: lr 8e-3, 200 epochs, 10 warmup,
global batch 256; only fc_norm and head train, on mean-pooled patch tokens, with softmax
cross-entropy) and probe_demo (its shape on the image demo corpus, train.json -> eval.json,
with a tiny model or the init_from one). Training images are random resized crops with
flips (data.crop_scale, data.hflip), evaluation images centre crops; the reference's timm
transform adds RandAugment and random erasing, which are not built here. `data.image_size`
is taken from the pretraining run. Set `--config.finetune.fast_probe=True` for a logistic
regression on frozen embeddings instead (seconds). Fine-tuning the whole image classifier
is not built yet: mode 'finetune' is refused for images.
"""
import ml_collections

from configs import finetune_audio
from configs import image as image_config

VARIANTS = ("in1k_probe", "probe_demo")


def get_config(arg: str = "in1k_probe") -> ml_collections.ConfigDict:
  """Returns variant `arg` (see the module doc)."""
  if arg not in VARIANTS:
    raise ValueError(f"configs/finetune_image.py: unknown variant {arg!r} "
                     f"(known: {', '.join(VARIANTS)})")
  demo = arg == "probe_demo"
  c = image_config.get_config("demo" if demo else "")
  c.mode = "probe"
  c.init_phase = ""             # finished phase of init_from; "" = its last
  c.data.eval_manifest = ""     # evaluation manifest or class folder (same classes)
  c.finetune = finetune_audio.finetune_block(8e-3, 200, 10, 256, "ce")
  c.finetune.update(mask_2d=False, mask_t_prob=0.0, mask_f_prob=0.0)
  if demo:
    c.data.eval_manifest = "{workdir}/demo_images/eval.json"
    c.finetune.update(batch_size=16, epochs=8, warmup_epochs=1, lr=1e-2)
    c.checkpoint_every = 100
    c.log_every = 10
  return c
