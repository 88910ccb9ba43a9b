"""Image fine-tuning and linear-probe recipes of the reference (ImageNet-1K, BRIDLE §6.6),
plus CPU demos.

Usage:
  python -m bridle_jax.main --config=configs/finetune_image.py:in1k \
      --config.init_from=PRETRAIN_WORKDIR --workdir=DIR \
      --config.data.manifest=/data/imagenet/train --config.data.eval_manifest=/data/imagenet/val
  python -m bridle_jax.main --config=configs/finetune_image.py:probe_demo \
      --config.init_from=IMAGE_DEMO_WORKDIR --workdir=DIR       # 2-core CPU

Variants: in1k (the reference's submit_ft_img.sh: lr 5e-4, 200 epochs, 5 warmup, global
batch 1024), in1k_probe (submit_lp_img.sh: lr 8e-3, 200 epochs, 10 warmup, batch 256; only
fc_norm and head train), and `finetune_demo` / `probe_demo`, their shapes on the image demo
corpus (train.json -> eval.json) with a tiny model or the init_from one. Both train on the
reference's timm transform: random resized crop (scale 0.08-1, bicubic), flip, RandAugment
rand-m9-mstd0.5-inc1, normalisation, random erasing 0.25 (per-pixel noise); evaluation
takes the centre crop. The loss is softmax cross-entropy; the fine-tuned model learns its
pos_embed (timm's, started from the pretrained table, no weight decay), as the reference.
Shared with audio: layer decay 0.75, wd 5e-4, drop path 0.1, min lr 1e-6, mean pooling,
fc_norm. Not reproduced: the pre-HEAD timm Mixup and label smoothing (HEAD never applies
them). `data.image_size` is taken from the pretraining run.
"""
import ml_collections

from bridle_jax import config_files

finetune_audio = config_files.sibling(__file__, "finetune_audio")
image_config = config_files.sibling(__file__, "image")

# name: (mode, lr, epochs, warmup_epochs, global batch)
RECIPES = {"in1k": ("finetune", 5e-4, 200, 5, 1024), "in1k_probe": ("probe", 8e-3, 200, 10, 256)}
DEMOS = {"finetune_demo": "in1k", "probe_demo": "in1k_probe"}


def get_config(arg: str = "in1k") -> ml_collections.ConfigDict:
  """Returns variant `arg` (see the module doc)."""
  if arg not in RECIPES and arg not in DEMOS:
    raise ValueError(f"configs/finetune_image.py: unknown variant {arg!r} "
                     f"(known: {', '.join([*RECIPES, *DEMOS])})")
  demo = arg in DEMOS
  mode, lr, epochs, warmup, batch_size = RECIPES[DEMOS.get(arg, arg)]
  c = image_config.get_config("demo" if demo else "")
  c.mode = mode
  c.init_phase = ""             # finished phase of init_from; "" = its last
  d = c.data
  d.eval_manifest = ""          # evaluation manifest or class folder (same classes)
  d.crop_scale = (0.08, 1.0)
  d.randaugment = "rand-m9-mstd0.5-inc1"
  d.reprob = 0.25
  c.finetune = finetune_audio.finetune_block(lr, epochs, warmup, batch_size, "ce")
  c.finetune.update(mask_2d=False, mask_t_prob=0.0, mask_f_prob=0.0,
                    learn_pos_embed=mode == "finetune")
  if demo:
    d.eval_manifest = "{workdir}/demo_images/eval.json"
    c.finetune.update(batch_size=16, epochs=8, warmup_epochs=1,
                      lr=2e-3 if mode == "finetune" else 1e-2)
    c.checkpoint_every = 100
    c.log_every = 10
  return c
