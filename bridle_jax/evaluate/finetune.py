"""Fine-tuning, linear probing and k-fold cross-validation of a pretrained encoder.

  python -m bridle_jax.main --config=configs/finetune_audio.py:esc50 \
      --config.init_from=PRETRAIN_WORKDIR --workdir=DIR [--config.data.manifest=...]

`config.mode` (or --mode) picks what runs:
  finetune  the whole classifier (`models.classifier`) trains with layer-wise lr decay, drop
            path, optional patch masking and, for audio, waveform mixup and SpecAugment.
  probe     the reference linear probe: only fc_norm and head train, on the same augmented
            stream. With `finetune.fast_probe` a logistic regression on the frozen encoder's
            mean-pooled embeddings replaces it (`fast_probe`; seconds, for quick checks).
Image encoders (configs/finetune_image.py) train on the reference's timm transform (random
resized crop, flip, RandAugment, random erasing) and are evaluated on centre crops.

The encoder comes from `init_from` (a pretraining workdir; `init_phase`, default its last
finished phase), whose architecture fields replace `config.model`'s; without `init_from`
the classifier starts from random weights (a baseline). The model is evaluated on
`data.eval_manifest` every `finetune.eval_every_epochs` epochs and at the end; with
`finetune.kfold` the manifest's `fold` field splits it instead: one run per fold, trained on
the others, tested on it, and the metrics averaged. Results ("final" at the last step and
"best" over evaluations, as the reference reports its maximum) go to summary.json;
checkpoints/<run>/ holds resumable state (rerun the command to resume; finished runs are
skipped), checkpoints/<run>_final the trained params.
"""
import copy
import functools
import math
import os
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from bridle_jax import config_validation
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import inputs
from bridle_jax.data import pipeline
from bridle_jax.data import sources
from bridle_jax.evaluate import embeddings
from bridle_jax.evaluate import fast_probe
from bridle_jax.evaluate import layer_decay
from bridle_jax.evaluate import metrics
from bridle_jax.models import classifier as classifier_lib
from bridle_jax.models import platform
from bridle_jax.train import checkpoint
from bridle_jax.train import device_memory
from bridle_jax.train import monitor
from bridle_jax.train import optim
from bridle_jax.train import preemption
from bridle_jax.train import sharding
from bridle_jax.train import state as state_lib
from bridle_jax.train import steps

MODES = ("finetune", "probe")
LOSSES = ("bce", "ce")
PROBE_KEYS = ("fc_norm", "head")
# config.model fields taken from the pretrained workdir.
ARCHITECTURE_FIELDS = ("size", "width", "depth", "num_heads", "mlp_ratio", "patch_size",
                       "pos_grid", "in_chans")
# AST's sample weights: a clip weighs sum over its labels of WEIGHT_SCALE / (count + eps).
WEIGHT_SCALE = 1000.0
WEIGHT_EPS = 0.01


@flax.struct.dataclass
class ClassifierState:
  """What a fine-tuning or probe step reads and returns."""
  step: jax.Array      # optimizer steps taken
  params: dict         # classifier params
  opt_state: Any       # optax state of the trainable subset
  rng: jax.Array
  skipped_updates: jax.Array  # steps whose loss or gradient was not finite


class SubsetSource:
  """The records `indices` of a source (a k-fold split), with its classes and label table."""

  def __init__(self, source, indices):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.class_names = source.class_names
    self.label_ids = source.label_ids

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[sources.check_index(index, len(self))])]

  def label_table(self) -> tuple[np.ndarray, np.ndarray]:
    values, offsets = self.source.label_table()
    lengths = np.diff(offsets)[self.indices]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)])
    take = np.repeat(offsets[self.indices] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
    return values[take], new_offsets


class WeightedSource:
  """AST-style weighted sampling, as a virtual source of `num_epochs` x `epoch_size` records.

  Each epoch holds `epoch_size` distinct clips drawn with probability proportional to their
  weights, one after another without replacement (the reference's
  WeightedRandomSampler(replacement=False)): the epoch's clips are those with the largest
  keys log(u) / weight, u ~ U(0, 1) from (seed, epoch) alone, in decreasing key order. That
  order is already random, so the pipeline reads these records unshuffled, in order, and
  each worker computes an epoch's draw once; the stream is deterministic and resumable.
  """

  def __init__(self, source, weights: np.ndarray, epoch_size: int, num_epochs: int, seed: int):
    weights = np.asarray(weights, np.float64)
    if weights.shape != (len(source),) or (weights < 0).any() or weights.sum() <= 0:
      raise ValueError("sample weights must be one non-negative value per clip, not all zero")
    if epoch_size > np.count_nonzero(weights):
      raise ValueError(f"finetune.epoch_samples={epoch_size} exceeds the "
                       f"{np.count_nonzero(weights)} clips with a non-zero sample weight")
    self.source = source
    self.class_names = source.class_names
    self.label_ids = source.label_ids
    self._weights = weights
    self._epoch_size = epoch_size
    self._length = epoch_size * num_epochs
    self._seed = seed
    self._drawn = (-1, None)  # (epoch, its clips in draw order)

  def __len__(self) -> int:
    return self._length

  def _epoch(self, epoch: int) -> np.ndarray:
    if self._drawn[0] != epoch:
      u = np.random.default_rng([self._seed, epoch]).random(len(self._weights))
      with np.errstate(divide="ignore"):
        keys = np.log(u) / self._weights  # zero weight: -inf, never drawn
      top = np.argpartition(-keys, self._epoch_size - 1)[:self._epoch_size]
      self._drawn = (epoch, top[np.argsort(-keys[top], kind="stable")])
    return self._drawn[1]

  def __getitem__(self, index: int) -> dict:
    epoch, position = divmod(sources.check_index(index, len(self)), self._epoch_size)
    return self.source[int(self._epoch(epoch)[position])]


def sample_weights(source) -> np.ndarray:
  """AST's per-clip weights: the sum over the clip's labels c of 1000 / (count(c) + 0.01).

  Rare classes weigh more; unlabelled clips weigh 0 and are never drawn.
  """
  values, offsets = source.label_table()
  counts = np.bincount(values, minlength=len(source.class_names))
  rows = np.repeat(np.arange(len(source)), np.diff(offsets))
  label_weight = WEIGHT_SCALE / (counts + WEIGHT_EPS)
  return np.bincount(rows, weights=label_weight[values], minlength=len(source))


def clip_folds(source) -> np.ndarray:
  """The manifest `fold` of every clip (-1 where absent)."""
  return np.asarray([source[i]["fold"] for i in range(len(source))], np.int64)


def classification_loss(kind: str) -> Callable:
  """(logits, soft multi-hot targets) -> mean loss: 'bce' per class (multi-label) or 'ce'."""
  if kind == "bce":
    return lambda logits, targets: optax.sigmoid_binary_cross_entropy(logits, targets).mean()

  def cross_entropy(logits, targets):
    targets = targets / jnp.maximum(targets.sum(-1, keepdims=True), 1e-6)
    return optax.softmax_cross_entropy(logits, targets).mean()
  return cross_entropy


def trainable_keys(mode: str, params: dict) -> tuple[str, ...]:
  """The top-level params a mode updates: all for finetune, fc_norm and head for probe."""
  return PROBE_KEYS if mode == "probe" else tuple(params)


def train_step(state: ClassifierState, batch: dict, schedule: optim.WarmupCosine, *,
               model: nn.Module, features: Callable, loss_fn: Callable,
               tx: optax.GradientTransformation, scales: dict, trainable: tuple[str, ...]):
  """One optimizer step on the trainable params: (state, batch, lr schedule) -> (state,
  metrics)."""
  rng, aug_rng, dropout_rng, mask_rng = jax.random.split(state.rng, 4)
  x = features(batch, aug_rng)  # SpecAugment (audio) or random erasing (images) where set
  updated = {k: state.params[k] for k in trainable}
  frozen = {k: v for k, v in state.params.items() if k not in updated}

  def loss_of(params):
    logits = model.apply({"params": {**frozen, **params}}, x, train=True,
                         rngs={"dropout": dropout_rng, "mask": mask_rng})
    return loss_fn(logits, batch["label"])

  loss, grads = jax.value_and_grad(loss_of)(updated)
  direction, opt_state = tx.update(grads, state.opt_state, updated)
  direction = jax.tree.map(lambda d, s: d * s, direction, {k: scales[k] for k in trainable})
  lr = schedule(state.step)
  params = {**state.params, **optim.apply_direction(updated, direction, lr)}
  grad_norm = optim.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # As in pretraining, a non-finite loss or gradient leaves params and optimizer untouched.
  params, opt_state = steps.if_finite(finite, (params, opt_state), (state.params, state.opt_state))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng,
                            skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
  return new_state, {"loss": loss, "lr": lr, "grad_norm": grad_norm}


def eval_step(params: dict, batch: dict, *, model: nn.Module, features: Callable):
  """Logits of a batch without augmentation; labels and the row mask pass through."""
  x = features(batch, None)
  return model.apply({"params": params}, x, train=False), batch["label"], batch["mask"]


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise config_validation.ConfigError(f"{field}: {message}")


def validate(config, mode: str) -> None:
  """Raises ConfigError naming the first invalid fine-tuning field."""
  ft = config.finetune
  _require(mode in MODES, "mode", f"{mode!r} is not one of {', '.join(map(repr, MODES))}")
  if inputs.modality(config.data) == "image":
    _require(not ft.mask_2d, "finetune.mask_2d", "time/frequency masking is for audio")
  _require(ft.loss in LOSSES, "finetune.loss", f"{ft.loss!r} is not one of 'bce', 'ce'")
  for field in ("batch_size", "epochs", "lr", "fast_probe_steps"):
    _require(ft[field] > 0, f"finetune.{field}", f"must be > 0, got {ft[field]!r}")
  _require(0 <= ft.warmup_epochs <= ft.epochs, "finetune.warmup_epochs", "must lie in [0, epochs]")
  _require(ft.steps >= 0, "finetune.steps", f"must be >= 0, got {ft.steps}")
  _require(ft.eval_every_epochs >= 1, "finetune.eval_every_epochs",
           f"must be >= 1, got {ft.eval_every_epochs}")
  _require(0 < ft.layer_decay <= 1, "finetune.layer_decay",
           f"must lie in (0, 1], got {ft.layer_decay}")
  _require(0 <= ft.drop_path < 1, "finetune.drop_path", f"must lie in [0, 1), got {ft.drop_path}")
  for field in ("mask_t_prob", "mask_f_prob"):
    _require(0 <= ft[field] < 1, f"finetune.{field}", f"must lie in [0, 1), got {ft[field]}")
  _require(ft.epoch_samples >= 0, "finetune.epoch_samples", f"must be >= 0, got {ft.epoch_samples}")
  _require(ft.kfold or bool(config.data.eval_manifest), "data.eval_manifest",
           "is empty; set the evaluation manifest or finetune.kfold=True")


def adopt_pretrained_architecture(config) -> None:
  """Copies the encoder architecture of `config.init_from` into `config.model`; for audio
  its clip length into `model.pos_table_frames` (shorter clips take their pos rows from that
  table), for images its `data.image_size` (the fixed pos table has one size)."""
  pretrained_config = workdir_lib.load_config(config.init_from)
  modality = inputs.modality(pretrained_config.data)
  if modality != inputs.modality(config.data):
    raise ValueError(f"init_from: {config.init_from} pretrained on {modality} input, and this "
                     f"config reads {inputs.modality(config.data)}; use "
                     f"configs/finetune_{modality}.py")
  pretrained = {field: pretrained_config.model[field] for field in ARCHITECTURE_FIELDS}
  if modality == "audio":
    pretrained["pos_table_frames"] = pretrained_config.data.target_length
  else:
    if config.data.image_size != pretrained_config.data.image_size:
      logging.info("data.image_size: %d from %s (config had %d)",
                   pretrained_config.data.image_size, config.init_from, config.data.image_size)
      config.data.image_size = pretrained_config.data.image_size
    for field in ("mean", "std"):
      if tuple(config.data[field]) != tuple(pretrained_config.data[field]):
        logging.warning("data.%s: %s, but %s pretrained with %s; the encoder sees pixels "
                        "normalised differently", field, tuple(config.data[field]),
                        config.init_from, tuple(pretrained_config.data[field]))
  for field, value in pretrained.items():
    if config.model[field] != value:
      logging.info("model.%s: %s from %s (config had %s)", field, value, config.init_from,
                   config.model[field])
      config.model[field] = value


def _init_phase(config) -> str:
  done = workdir_lib.finished_phases(config.init_from)
  phase = config.init_phase or (done[-1] if done else "")
  if phase not in done:
    raise FileNotFoundError(f"init_from: no finished phase {phase!r} in {config.init_from} "
                            f"(finished: {done})")
  return phase


def _started_init_phase(workdir: str, init_from: str) -> str:
  """The phase of `init_from` a resumed workdir's runs started from ("" for a new workdir
  or another init_from): an empty init_phase means init_from's last phase when the first
  run started, so that folds run later do not take a phase init_from finished since."""
  if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
    return ""
  saved = workdir_lib.load_config(workdir)
  return saved.get("init_phase", "") if saved.get("init_from") == init_from else ""


def _open_eval_source(config, train_source):
  data = copy.deepcopy(config.data)
  data.manifest = config.data.eval_manifest
  try:
    eval_source = sources.open_source(data)
  except sources.DataError as e:
    message = str(e)
    if message.startswith("data.manifest"):  # the field the user set is eval_manifest
      message = "data.eval_manifest" + message[len("data.manifest"):]
    raise sources.DataError(message) from e
  if list(eval_source.label_ids) != list(train_source.label_ids):
    raise sources.DataError("data.eval_manifest: its classes differ from data.manifest's")
  return eval_source


def _splits(config, source, name: str) -> list[tuple[str, Any, Any]]:
  """(run id, train source, eval source) of every run: `name`, or one per fold."""
  if sources.label_statistics(source)["num_unlabelled"] == len(source):
    raise sources.DataError(
        f"data.manifest: none of its {len(source)} clips has a label, so there is nothing to "
        "fine-tune on (a JSON entry lists its classes as \"labels\": \"mid1,mid2\")")
  if config.finetune.kfold:
    return [(f"fold{fold}", SubsetSource(source, train), SubsetSource(source, test))
            for fold, train, test in metrics.kfold_splits(clip_folds(source))]
  return [(name, source, _open_eval_source(config, source))]


def primary_metric(config) -> str:
  return "mAP" if config.data.multi_label else "accuracy"


class Finetuner:
  """Trains and evaluates classifiers for one config: what every run (fold) shares."""

  def __init__(self, config, workdir: str, mode: str, devices=None):
    self.config = config
    self.workdir = workdir
    self.mode = mode
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_divides("finetune.batch_size", config.finetune.batch_size, self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.compiler_options = platform.model_compiler_options(config.model)
    self.source = sources.open_source(config.data)
    grid = classifier_lib.input_grid(config.model, config.data)
    self.model = classifier_lib.classifier_from_config(config.model, config.finetune, grid,
                                                       len(self.source.class_names))
    self.features = inputs.device_features(config.data)
    self.batch_keys = (*inputs.batch_keys(config.data), "label")
    self.tx = layer_decay.adamw_direction(config.finetune)
    rng = jax.random.PRNGKey(config.seed)
    self.abstract = jax.eval_shape(self._fresh_state, rng)
    self.shardings = sharding.shardings_for(self.abstract, self.mesh, config.sharding_rules)
    params = nn.unbox(self.abstract.params)
    self.trainable = trainable_keys(mode, params)
    self.scales = layer_decay.lr_scales(params, config.model.depth, config.finetune.layer_decay)
    batch_shardings = {k: self.batch_sharding for k in self.batch_keys}
    self.eval_step = jax.jit(
        functools.partial(eval_step, model=self.model, features=self.features),
        in_shardings=(self.shardings.params, {**batch_shardings, "mask": self.batch_sharding}),
        out_shardings=self.replicated, compiler_options=self.compiler_options)
    self.encoder_params = self._pretrained_encoder() if config.init_from else None
    self._start = jax.jit(self._start_state, out_shardings=self.shardings)
    ft = config.finetune
    # One program for every run: the lr schedule is an input, so folds of any length share it.
    self._train_step = jax.jit(
        functools.partial(train_step, model=self.model, features=self.features,
                          loss_fn=classification_loss(ft.loss), tx=self.tx, scales=self.scales,
                          trainable=self.trainable),
        in_shardings=(self.shardings, batch_shardings, self.replicated),
        out_shardings=(self.shardings, self.replicated), donate_argnums=0,
        compiler_options=self.compiler_options)
    self.preemption = preemption.PreemptionNotice()

  def _fresh_state(self, rng) -> ClassifierState:
    """Annotated initial state: fresh classifier params, optimizer over the trainable ones."""
    params_rng, mask_rng, state_rng = jax.random.split(rng, 3)
    x = jnp.zeros((1, *inputs.input_shape(self.config.data)), jnp.float32)
    params = self.model.init({"params": params_rng, "mask": mask_rng}, x)["params"]
    trainable = trainable_keys(self.mode, params)
    return ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=self.tx.init({k: params[k] for k in trainable}),
                           rng=state_rng, skipped_updates=jnp.zeros((), jnp.int32))

  def _pretrained_encoder(self) -> dict:
    """The init_from encoder params, restored straight into this mesh's shardings."""
    config = self.config
    phase = _init_phase(config)
    pretrain_config = workdir_lib.load_config(config.init_from)
    abstract = workdir_lib.abstract_pretrained(state_lib.build_models(pretrain_config))
    shardings = sharding.shardings_for(abstract, self.mesh, config.sharding_rules)
    tree = workdir_lib.restore_final(workdir_lib.final_dir(config.init_from, phase),
                                     sharding.with_shardings(nn.unbox(abstract), shardings))
    logging.info("encoder from %s phase %s", config.init_from, phase)
    return tree["params"]["encoder"]

  def _start_state(self, encoder, rng) -> ClassifierState:
    state = nn.unbox(self._fresh_state(rng))
    if encoder is None:
      return state
    return state.replace(params=classifier_lib.with_encoder_params(state.params, encoder))

  def initial_state(self, index: int) -> ClassifierState:
    """Step 0 of run `index`: fresh classifier, pretrained encoder params when configured."""
    return self._start(self.encoder_params,
                       jax.random.fold_in(jax.random.PRNGKey(self.config.seed), index))

  def train_step_fn(self, total: int, warmup: int) -> Callable:
    """(state, batch) -> (state, metrics): the compiled step with a schedule of `total` steps,
    `warmup` of them warmup."""
    ft = self.config.finetune
    schedule = jax.device_put(optim.warmup_cosine(ft.lr, ft.min_lr, warmup, total),
                              self.replicated)
    return lambda state, batch: self._train_step(state, batch, schedule)

  def device_batch(self, host_batch: dict) -> dict:
    return pipeline.to_device_batch(host_batch, self.batch_sharding)

  def run(self) -> dict:
    """Runs every unfinished run (fold); returns the summary written to summary.json."""
    progress = checkpoint.read_progress(self.workdir)
    results = progress.setdefault("runs", {})
    splits = _splits(self.config, self.source, self.mode)
    for index, (run_id, train_source, eval_source) in enumerate(splits):
      if run_id in results:
        logging.info("%s: already done", run_id)
        continue
      self.preemption.stop_if_requested(f"{run_id}: preempted before it started")
      with device_memory.fields_on_out_of_memory("finetune", self.config.finetune.batch_size,
                                                 sharding.batch_shards(self.mesh)):
        results[run_id] = self.train_and_evaluate(run_id, index, train_source, eval_source)
      checkpoint.write_progress(self.workdir, progress)
    summary = summarise(self.config, self.mode, results)
    monitor.write_summary(self.workdir, summary)
    return summary

  def train_and_evaluate(self, run_id: str, index: int, train_source, eval_source) -> dict:
    """Trains one classifier (resuming from its checkpoint) and evaluates it."""
    config, ft = self.config, self.config.finetune
    epoch_samples = ft.epoch_samples or len(train_source)
    steps_per_epoch = epoch_samples // ft.batch_size
    if steps_per_epoch == 0:
      raise ValueError(f"finetune.batch_size={ft.batch_size} exceeds the {epoch_samples} clips "
                       f"of an epoch of run {run_id}")
    total = ft.steps or ft.epochs * steps_per_epoch
    warmup = round(total * ft.warmup_epochs / ft.epochs)
    eval_every = ft.eval_every_epochs * steps_per_epoch
    train_data = train_source
    if ft.weighted_sampler:
      train_data = WeightedSource(train_source, sample_weights(train_source), epoch_samples,
                                  math.ceil(total / steps_per_epoch), config.seed + index)
    step_fn = self.train_step_fn(total, warmup)
    ckpt = checkpoint.PhaseCheckpointer(os.path.join(self.workdir, "checkpoints", run_id),
                                        save_every=config.checkpoint_every,
                                        keep=config.keep_checkpoints)
    data_state = None
    if ckpt.latest_step() is not None:
      state, data_state = ckpt.restore(
          sharding.with_shardings(nn.unbox(self.abstract), self.shardings))
      logging.info("%s: resumed at step %d", run_id, int(state.step))
    else:
      state = self.initial_state(index)
    iterator = pipeline.DataStream(train_data, config.data, global_batch_size=ft.batch_size,
                                   seed=config.seed + index, saved=data_state,
                                   mixup_source=train_source, shuffle=not ft.weighted_sampler)
    evals = {int(k): v for k, v in checkpoint.read_progress(self.workdir)
             .get("evals", {}).get(run_id, {}).items() if int(k) <= int(state.step)}
    logging.info("%s: %s, %d steps (%d per epoch), batch %d, %d train / %d eval clips", run_id,
                 self.mode, total, steps_per_epoch, ft.batch_size, len(train_source),
                 len(eval_source))
    step = int(state.step)
    run_monitor = monitor.PhaseMonitor(self.workdir, run_id, total, ft.batch_size,
                                       config.log_every, config.log_every,
                                       is_writer=jax.process_index() == 0, start_step=step)
    with ckpt.commits_on_error():
      while step < total:
        host_batch = next(iterator)
        state, step_metrics = step_fn(state, self.device_batch(
            {k: host_batch[k] for k in self.batch_keys}))
        step += 1
        run_monitor.record(step, step_metrics)
        due_save = ckpt.should_save(step) or step == total
        if due_save or step % config.log_every == 0:
          steps.check_skipped_updates(run_id, int(state.skipped_updates),
                                      config.max_nonfinite_updates)
        # Evaluated before the save, so that a checkpoint at an evaluation step always has
        # its evaluation recorded.
        if step % eval_every == 0 or step == total:
          self._evaluate_into(evals, run_id, step, state.params, eval_source)
        if due_save:
          run_monitor.sync()
          ckpt.save(step, state, iterator.get_state(), force=step == total)
        if self.preemption.requested():
          run_monitor.sync()
          ckpt.save(step, state, iterator.get_state(), force=True)
          ckpt.wait()
          raise preemption.Preempted(preemption.stop_message(run_id, step, total))
    ckpt.wait()
    ckpt.close()
    final = checkpoint.PhaseCheckpointer(workdir_lib.final_dir(self.workdir, run_id),
                                         save_every=1, keep=1, async_save=False)
    final.save(total, {"params": state.params}, None, force=True)
    final.close()
    key = primary_metric(config)
    best = best_step(evals, key)
    train_summary = run_monitor.finish()
    train_summary.update(skipped_clips=iterator.skipped_clips_of_all_hosts())
    return {"final": evals[total], "best": evals[best], "best_step": best,
            "primary_metric": key, "train_clips": len(train_source),
            "eval_clips": len(eval_source), "evals": {str(s): evals[s] for s in sorted(evals)},
            "train": train_summary}

  def restore_final_params(self, run_id: str) -> dict:
    """The trained classifier params of a finished run, in this mesh's shardings."""
    abstract = sharding.with_shardings(nn.unbox(self.abstract.params), self.shardings.params)
    return workdir_lib.restore_final(workdir_lib.final_dir(self.workdir, run_id),
                                     {"params": abstract})["params"]

  def _evaluate_into(self, evals: dict, run_id: str, step: int, params: dict, source) -> None:
    """Evaluates, logs, and records the result in `evals` and progress.json (for resumes)."""
    evals[step] = self.evaluate(params, source)
    logging.info("%s step %d eval: %s", run_id, step, _format(evals[step]))
    progress = checkpoint.read_progress(self.workdir)
    progress.setdefault("evals", {})[run_id] = {str(s): m for s, m in evals.items()}
    checkpoint.write_progress(self.workdir, progress)

  def evaluate(self, params: dict, source) -> dict:
    """`metrics.classification_metrics` of the classifier over every readable clip of source."""
    batch_size = self.config.finetune.batch_size
    hosts = jax.process_count()
    host_batch = pipeline.host_batch_size(batch_size, hosts)
    # Every host runs the same number of steps; a host out of clips feeds masked padding.
    num_batches = math.ceil(math.ceil(len(source) / hosts) / host_batch)
    iterator = iter(pipeline.build_dataset(source, self.config.data, global_batch_size=batch_size,
                                           seed=self.config.seed, num_epochs=1, train=False))
    outputs = []
    skipped = 0
    for _ in range(num_batches):
      batch = next(iterator, None)
      if batch is not None:
        skipped += int(batch["skipped"].sum())
      outputs.append(self.eval_step(params, self.device_batch(
          _padded_batch(batch, host_batch, source, self.config.data))))
    outputs = jax.device_get(outputs)  # one transfer, after every batch is dispatched
    scores = np.concatenate([logits[mask] for logits, _, mask in outputs])
    labels = np.concatenate([label[mask] for _, label, mask in outputs])
    result = metrics.classification_metrics(scores, labels)
    result["skipped_clips"] = skipped
    return result


def best_step(evals: dict, key: str) -> int:
  """The step of the best of `evals` ({step: metrics}) by metric `key`, the later one on a
  tie; a NaN or missing value ranks last."""
  def rank(step):
    value = evals[step].get(key)
    return (-math.inf if value is None or math.isnan(value) else value, step)
  return max(evals, key=rank)


def _padded_batch(batch: dict | None, size: int, source, data_config) -> dict:
  """The eval inputs of a (possibly partial or absent) host batch, padded to `size` rows."""
  rows = 0 if batch is None else len(batch["label"])
  padded = {key: np.zeros(shape, dtype)
            for key, (shape, dtype) in inputs.batch_shapes(data_config, size).items()}
  padded["label"] = np.zeros((size, len(source.class_names)), np.float32)
  if rows:
    for key in padded:
      padded[key][:rows] = batch[key]
  padded["mask"] = np.arange(size) < rows
  return padded


def _format(result: dict) -> str:
  return " | ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float))


def summarise(config, mode: str, results: dict) -> dict:
  """summary.json: every run's results and, for k-fold, the mean over folds."""
  summary = {"mode": mode, "primary_metric": primary_metric(config),
             "init_from": config.init_from, "init_phase": config.init_phase, "runs": results}
  if config.finetune.kfold:
    summary["mean_final"] = metrics.mean_over_runs([r["final"] for r in results.values()])
    summary["mean_best"] = metrics.mean_over_runs([r["best"] for r in results.values()])
  return summary


def run_fast_probe(config, workdir: str) -> dict:
  """Logistic regression on the frozen encoder's mean-pooled embeddings (per split)."""
  source = sources.open_source(config.data)
  data, model_cfg = config.data, config.model
  if config.init_from:
    _, _, tree = workdir_lib.load_pretrained(config.init_from, _init_phase(config))
    encoder_params = tree["params"]["encoder"]
  else:
    encoder_params = embeddings.random_encoder_params(model_cfg, data,
                                                      jax.random.PRNGKey(config.seed))
  embedder = embeddings.Embedder(model_cfg, data, encoder_params)
  ft = config.finetune
  results = {}
  pooled = embedder.embed_source(source)["pooled"]
  labels = embeddings.multi_hot_labels(source)
  for run_id, train_source, eval_source in _splits(config, source, "fast_probe"):
    if config.finetune.kfold:
      train_x, train_y = pooled[train_source.indices], labels[train_source.indices]
      eval_x, eval_y = pooled[eval_source.indices], labels[eval_source.indices]
    else:
      train_x, train_y = pooled, labels
      eval_x = embedder.embed_source(eval_source)["pooled"]
      eval_y = embeddings.multi_hot_labels(eval_source)
    result = fast_probe.fit_and_evaluate(train_x, train_y, eval_x, eval_y,
                                         multi_label=bool(data.multi_label),
                                         l2=ft.fast_probe_l2, steps=ft.fast_probe_steps)
    logging.info("%s fast probe: %s", run_id, _format(result))
    train_clips, eval_clips = (int(np.isfinite(x).all(1).sum()) for x in (train_x, eval_x))
    results[run_id] = {"final": result, "best": result, "primary_metric": primary_metric(config),
                       "train_clips": train_clips, "eval_clips": eval_clips,
                       "skipped_clips": len(train_x) + len(eval_x) - train_clips - eval_clips}
  summary = summarise(config, "fast_probe", results)
  monitor.write_summary(workdir, summary)
  return summary


def run(config, workdir: str, mode: str | None = None) -> dict:
  """Entry point of `bridle_jax.main` for modes finetune and probe (after prepare.prepare)."""
  mode = mode or config.mode
  config.mode = mode
  config.data.eval_manifest = config_validation.expand_path(config.data.eval_manifest, workdir)
  validate(config, mode)
  if config.init_from:
    adopt_pretrained_architecture(config)
    if not config.init_phase:
      config.init_phase = _started_init_phase(workdir, config.init_from) or _init_phase(config)
  else:
    logging.warning("init_from is empty: the classifier starts from random weights")
  config_validation.validate_config(config)
  workdir_lib.check_finetune_resumable(config, workdir)
  workdir_lib.save_config(config, workdir)
  if mode == "probe" and config.finetune.fast_probe:
    return run_fast_probe(config, workdir)
  return Finetuner(config, workdir, mode).run()
