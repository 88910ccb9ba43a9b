"""Audio BRIDLE pretraining: ViT-B/16 on 1024x128 log-mel fbank (AudioSet recipe).

Usage:
  python -m bridle_jax.main --config=configs/audio.py --workdir=DIR \
      --config.data.manifest=train.json --config.data.label_csv=class_labels_indices.csv
  python -m bridle_jax.main --config=configs/audio.py:demo --workdir=DIR   # 2-core CPU demo

The default holds the official recipe: mask 0.8, Swin decoder, RQ with 4 codebooks of
256 codes x 256 dims, EMA decay 0.99, k-means init, and the per-phase epochs / lr /
warmup / global batch of the reference launch scripts (8 nodes x 8 GPUs x 16). Where the
scripts differ from it: the tokenizer script leaves k-means off (uniform init and one
restart; its README calls k-means better), the encoder script passes `--soft_code 2`
(with the reference's farthest-code bug: `model.quantizer.soft_code=2
soft_code_farthest=True` reproduces it, for every phase), and the reference's roll never
moves the clip (`data.roll_mag_gain_only=True` reproduces it).
"""
import ml_collections

from bridle_jax.models.vit import VIT_SIZES


def _phase(epochs, warmup_epochs, lr, batch_size, weight_decay=1e-4):
  return ml_collections.ConfigDict(dict(
      epochs=epochs, warmup_epochs=warmup_epochs, lr=lr, min_lr=0.0,
      weight_decay=weight_decay, batch_size=batch_size,
      steps=0,              # > 0 overrides epochs x steps-per-epoch
      grad_accum=1,         # micro-batches per optimizer step (batch_size is the total)
      clip_grad=0.0,        # global-norm clipping; 0 = off (the reference never clips)
      betas=(0.9, 0.95), eps=1e-8))


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """Returns the audio recipe; `arg == "demo"` gives the small CPU variant."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "train"

  # ---- data ----
  c.data = d = ml_collections.ConfigDict()
  d.modality = "audio"         # audio | image (configs/image.py)
  d.format = "json"            # json | folder | tfds
  d.manifest = ""              # json manifest, class folder root, or built TFDS dir
  d.label_csv = ""             # class_labels_indices.csv (index, mid, display_name)
  d.demo_dir = ""              # when set, a demo corpus is generated there first
  # Paths may contain "{workdir}"; other relative paths resolve against the current dir.
  d.sample_rate = 16000
  d.num_mel_bins = 128
  d.target_length = 1024       # fbank frames per clip (pad/crop)
  d.mean = -4.4446096          # AudioSet statistics of the reference
  d.std = 3.3216383
  d.roll_mag_aug = True        # random circular roll + gain in (0.5, 1.5)
  d.roll_mag_gain_only = False # reference behaviour: its roll offset is always 0
  d.mixup = 0.0                # probability of waveform mixup (0 in pretraining)
  d.mixup_alpha = 10.0         # lambda ~ Beta(alpha, alpha)
  d.freqm = 0                  # SpecAugment frequency mask width bound (bins)
  d.timem = 0                  # SpecAugment time mask width bound (frames)
  d.num_workers = -1           # grain worker processes (-1: one per core less
                               # one, at most 16; 0: in-process)
  d.prefetch = 2               # batches decoded ahead by each worker (or in-process)
  d.multi_label = True
  d.max_clip_seconds = 60.0    # decode at most this much of a clip (0: all of it)

  # ---- model ----
  c.model = m = ml_collections.ConfigDict()
  m.dtype = "bfloat16"         # compute dtype; params and quantizer stay float32
  m.in_chans = 1
  m.patch_size = 16
  m.size = "B"                 # S | B | L sets width, depth and heads; any other name is free
  m.width, m.depth, m.num_heads = VIT_SIZES["B"]
  m.mlp_ratio = 4.0
  m.mask_ratio = 0.8
  m.mask_2d = False
  m.mask_t_prob = 0.7
  m.mask_f_prob = 0.3
  m.pos_grid = "reference"     # reference (8x64 grid quirk) | time_freq
  m.pos_table_frames = 0       # shorter clips take pos rows from this length's table; fine-
                               # tuning and embeddings set it to the pretraining length
  m.pos_crop = "reference"     # which rows: reference (its ESC-50 rows) | center
  m.attention_impl = "auto"    # auto (cuDNN on GPU with bf16, else XLA) | xla | cudnn
  m.remat = "none"             # none | dots | full: recompute blocks in the backward pass
  m.residual_stream_dtype = "float32"  # the ViTs' tokens between blocks: float32 (as under
                               # the reference's autocast) | compute (model.dtype: bf16
                               # halves their memory traffic)
  m.gelu = "exact"             # exact (erf, as the reference) | tanh (its approximation,
                               # which XLA:GPU folds into the fc1 matmul)
  m.gpu_matmuls = "auto"       # auto (XLA picks Triton or cuBLAS) | cublas (all cuBLAS: XLA
                               # folds bias adds and the tanh GELU into them)
  m.decoder = dec = ml_collections.ConfigDict()
  dec.mode = 1                 # 0 global transformer, 1 Swin local windows
  dec.width = 512
  dec.depth = 16
  dec.num_heads = 16
  dec.window = (4, 4)
  dec.shift = 2
  dec.no_shift = False
  dec.meta_mlp_dropout = 0.1
  dec.attention_impl = "auto"  # windows: auto (Pallas on GPU with bf16, else XLA) | xla | pallas
  m.tokenizer = tok = ml_collections.ConfigDict()
  tok.estimator_depth = 3
  m.quantizer = q = ml_collections.ConfigDict()
  q.type = "rq"                # rq (residual, BRIDLE) | vq (single BEATs-style codebook)
  q.num_codebooks = 4
  q.codebook_size = 256
  q.code_dim = 256
  q.decay = 0.99
  q.commitment_weight = 0.25
  q.kmeans_init = True
  q.kmeans_iters = 10
  q.restart_unused = True
  q.soft_code = 1
  q.soft_code_farthest = False # reference bug: soft codes pick the farthest codes

  # ---- training rounds ----
  c.rounds = ("encoder", "tokenizer", "encoder")  # first encoder phase: cold start
  c.encoder_phase = _phase(epochs=140, warmup_epochs=10, lr=5e-4, batch_size=1024)
  # Compute the frozen tokenizer's codes once per clip and reuse them on later epochs;
  # needs unaugmented input (data.roll_mag_aug=False, mixup=0, freqm=timem=0).
  c.encoder_phase.reuse_codes = False
  c.tokenizer_phase = _phase(epochs=31, warmup_epochs=2, lr=2e-4, batch_size=1024)
  c.joint_phase = _phase(epochs=200, warmup_epochs=10, lr=5e-4, batch_size=1024)
  # Restart codes unused in the batch every N steps (0: only on the first batch, as the
  # reference does).
  c.tokenizer_phase.restart_unused_every = 0
  c.joint_phase.restart_unused_every = 0
  c.joint_phase.tokenizer_loss_ratio = 0.2
  c.joint_phase.tokenizer_every = 4

  c.encoder_from_scratch = False   # re-initialise the encoder in each encoder phase
  c.init_from = ""                 # another workdir: start from its last finished phase

  # ---- devices, checkpoints, logs ----
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  # logical parameter axis -> mesh axes (None: replicated)
  c.sharding_rules = (("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
                      ("vocab", "model"), ("kv", None), ("patch", None), ("code", None))
  c.checkpoint_every = 1000        # steps; every phase also saves at its end
  c.keep_checkpoints = 3
  c.log_every = 50
  c.usage_every = 500              # codebook usage (fraction used, perplexity)
  c.max_nonfinite_updates = 20     # per phase; past it the run stops (skipped steps count)
  c.compile_cache_dir = "{workdir}/compile_cache"  # compiled steps, reloaded on a restart
                                   # ("": none; JAX_COMPILATION_CACHE_DIR, if set, wins)

  if arg == "demo":
    _shrink_for_demo(c)
  elif arg:
    raise ValueError(f"configs/audio.py: unknown variant {arg!r} (known: demo)")
  return c


def _shrink_for_demo(c: ml_collections.ConfigDict) -> None:
  """Tiny model and data so all rounds run on a 2-core CPU in minutes."""
  c.data.demo_dir = "{workdir}/demo_data"
  c.data.manifest = "{workdir}/demo_data/train.json"
  c.data.label_csv = "{workdir}/demo_data/class_labels_indices.csv"
  c.data.target_length = 128
  c.data.mean = -7.45          # measured on the demo corpus
  c.data.std = 3.75
  c.data.num_workers = 0
  c.data.multi_label = False
  shrink_training_for_demo(c)


def shrink_training_for_demo(c: ml_collections.ConfigDict) -> None:
  """The demos' tiny model, two-epoch phases and frequent checkpoints and logs."""
  c.model.dtype = "float32"
  c.model.size = "demo"
  c.model.width, c.model.depth, c.model.num_heads = 64, 2, 4
  c.model.decoder.width, c.model.decoder.depth, c.model.decoder.num_heads = 64, 2, 4
  c.model.tokenizer.estimator_depth = 1
  c.model.quantizer.codebook_size = 32
  c.model.quantizer.code_dim = 32
  for phase in (c.encoder_phase, c.tokenizer_phase, c.joint_phase):
    phase.batch_size = 16
    phase.epochs = 2
    phase.warmup_epochs = 0
    phase.lr = 1e-3
  # 50-step tokenizer phases end with about half the codes in use without periodic restarts.
  c.tokenizer_phase.restart_unused_every = 5
  c.joint_phase.restart_unused_every = 5
  c.checkpoint_every = 20
  c.log_every = 10
  c.usage_every = 10
