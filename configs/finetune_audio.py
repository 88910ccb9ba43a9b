"""Audio fine-tuning and linear-probe recipes of the reference (BRIDLE §6.6), plus CPU demos.

Usage:
  python -m bridle_jax.main --config=configs/finetune_audio.py:esc50 \
      --config.init_from=PRETRAIN_WORKDIR --workdir=DIR \
      --config.data.manifest=esc50.json --config.data.label_csv=esc50_labels.csv
  python -m bridle_jax.main --config=configs/finetune_audio.py:as20k_probe \
      --config.init_from=PRETRAIN_WORKDIR --workdir=DIR --config.data.manifest=bal_train.json \
      --config.data.eval_manifest=eval.json --config.data.label_csv=class_labels_indices.csv
  python -m bridle_jax.main --config=configs/finetune_audio.py:demo --workdir=DIR  # 2-core CPU

Variants: as2m, as20k, esc50, sc2 (fine-tuning), as2m_probe, as20k_probe, esc50_probe
(linear probe); `<variant>_demo` runs the variant's recipe shape on the bundled demo corpus
with a tiny model and few steps (esc50_demo: 5-fold over the corpus's folds); `demo` and
`probe_demo` are esc50_demo and esc50_probe_demo on the corpus's train.json -> eval.json.

Shared reference values: AdamW betas (0.9, 0.999), wd 5e-4 (not on biases, 1-D tensors and
cls_token), layer decay 0.75, drop path 0.1, min lr 1e-6, per-step warmup + cosine, waveform
mixup 0.5 with lambda ~ Beta(10, 10), SpecAugment freqm 48 / timem 192 (hard-coded in the
reference for every audio set), roll + gain augmentation (data.roll_mag_gain_only=True: the
reference's gain only), mean-pooled patch tokens -> fc_norm -> head.
Fine-tune-time 2-D patch masking 0.2 / 0.2 is what the reference fine-tuning scripts pass and
its AudioSet loop applied (its HEAD loop ignores it; set finetune.mask_t_prob/mask_f_prob to 0
for that). Linear probes do not mask: the reference's probe scripts pass no masking flags.
The reference trains every audio set with BCE; here single-label sets (ESC-50, Speech
Commands) use softmax cross-entropy (finetune.loss="bce" restores the reference).
Speech Commands has no reference script: its schedule is our choice, and its time mask is 48
frames since its clips are only 128 frames long.
"""
import ml_collections

from bridle_jax import config_files

audio_config = config_files.sibling(__file__, "audio")

# Dataset statistics of the reference: (mean, std) of the log-mel fbank.
DATASET_STATS = {"audioset": (-4.4446096, 3.3216383), "esc50": (-6.6268077, 5.358466),
                 "speechcommands": (-6.845978, 5.5654526)}

# name: (dataset, mode, target_length, lr, epochs, warmup_epochs, global batch, extra fields)
RECIPES = {
    "as2m": ("audioset", "finetune", 1024, 2e-4, 200, 10, 256,
             dict(weighted_sampler=True, epoch_samples=200_000)),
    "as20k": ("audioset", "finetune", 1024, 4e-4, 150, 10, 256, {}),
    "esc50": ("esc50", "finetune", 512, 2e-3, 300, 20, 64, dict(kfold=True)),
    "sc2": ("speechcommands", "finetune", 128, 1e-3, 60, 4, 256, {}),
    "as2m_probe": ("audioset", "probe", 1024, 4e-3, 250, 10, 256,
                   dict(weighted_sampler=True, epoch_samples=200_000)),
    "as20k_probe": ("audioset", "probe", 1024, 5e-3, 300, 8, 256, {}),
    # Not a reference script: the ESC-50 recipe as a linear probe, at the AS-20K probe lr.
    "esc50_probe": ("esc50", "probe", 512, 5e-3, 300, 20, 64, dict(kfold=True)),
}
MULTI_LABEL = {"audioset": True, "esc50": False, "speechcommands": False}
# Demos on the corpus's own train.json -> eval.json split (no k-fold).
DEMO_ALIASES = {"demo": "esc50", "probe_demo": "esc50_probe"}


def finetune_block(lr, epochs, warmup_epochs, batch_size, loss) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, min_lr=1e-6, weight_decay=5e-4,
      batch_size=batch_size,
      steps=0,                  # > 0 overrides epochs x steps-per-epoch
      clip_grad=0.0,            # global-norm clipping; 0 = off (the reference never clips)
      betas=(0.9, 0.999), eps=1e-8,
      layer_decay=0.75,         # lr x 0.75^(depth + 1 - layer)
      drop_path=0.1,            # block i drops with drop_path * i / (depth - 1)
      mask_2d=True,             # patch masking while training: whole time rows / freq columns
      mask_t_prob=0.2,          # (1-D random masking of this fraction when mask_2d is False)
      mask_f_prob=0.2,
      loss=loss,                # bce (multi-label) | ce (single-label)
      weighted_sampler=False,   # AST-style sampling weighted by inverse label frequency
      epoch_samples=0,          # clips per epoch; 0 = the training set's size
      eval_every_epochs=1,
      kfold=False,              # cross-validate over the manifest's `fold` field
      fast_probe=False,         # probe mode: logistic regression on frozen embeddings
      fast_probe_steps=300,     # L-BFGS iterations of the fast probe
      fast_probe_l2=1e-3,       # its L2 penalty (on standardised features)
      learn_pos_embed=False))   # fine-tune pos_embed (timm's for images); audio keeps it fixed


def get_config(arg: str = "esc50") -> ml_collections.ConfigDict:
  """Returns recipe `arg` (see the module doc); a `_demo` suffix gives its CPU demo."""
  name, demo = arg, False
  if arg in DEMO_ALIASES:
    name, demo = DEMO_ALIASES[arg], True
  elif arg.endswith("_demo"):
    name, demo = arg[:-len("_demo")], True
  if name not in RECIPES:
    known = ", ".join([*RECIPES, *(f"{n}_demo" for n in RECIPES), *DEMO_ALIASES])
    raise ValueError(f"configs/finetune_audio.py: unknown variant {arg!r} (known: {known})")
  dataset, mode, target_length, lr, epochs, warmup, batch_size, extra = RECIPES[name]

  c = audio_config.get_config()
  c.mode = mode
  c.init_phase = ""             # finished phase of init_from; "" = its last
  d = c.data
  d.eval_manifest = ""          # evaluation manifest (same classes as data.manifest)
  d.target_length = target_length
  d.mean, d.std = DATASET_STATS[dataset]
  d.multi_label = MULTI_LABEL[dataset]
  d.mixup = 0.5
  d.freqm = 48
  d.timem = 48 if dataset == "speechcommands" else 192
  c.finetune = finetune_block(lr, epochs, warmup, batch_size,
                               "bce" if d.multi_label else "ce")
  c.finetune.update(extra)
  if mode == "probe":  # the reference's probe scripts pass no masking flags
    c.finetune.update(mask_t_prob=0.0, mask_f_prob=0.0)
  if demo:
    _shrink_for_demo(c, keep_kfold=arg not in DEMO_ALIASES)
  return c


def _shrink_for_demo(c: ml_collections.ConfigDict, keep_kfold: bool) -> None:
  """Demo corpus, tiny model (or the init_from one) and a few epochs on a 2-core CPU."""
  demo = audio_config.get_config("demo")
  c.data.update(demo_dir=demo.data.demo_dir, manifest=demo.data.manifest,
                label_csv=demo.data.label_csv, eval_manifest="{workdir}/demo_data/eval.json",
                target_length=demo.data.target_length, mean=demo.data.mean, std=demo.data.std,
                num_workers=0, freqm=16, timem=32)
  c.model = demo.model
  ft = c.finetune
  ft.kfold = ft.kfold and keep_kfold
  ft.epoch_samples = 0
  ft.batch_size = 16
  ft.epochs = 8
  ft.warmup_epochs = 1
  ft.lr = 2e-3 if c.mode == "finetune" else 1e-2
  c.checkpoint_every = 100
  c.log_every = 10
