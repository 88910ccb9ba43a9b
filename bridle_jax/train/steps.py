"""Pure train steps for the encoder, tokenizer and joint phases.

Each phase defines a loss over the full parameter dict; `train_step` differentiates it
with respect to the groups the phase updates, so frozen modules (the tokenizer in the
encoder phase, the teacher encoder in the tokenizer phase) receive no gradient and no
update. fbank runs here, on the device. Codebook statistics are sums over the global
batch: under jit with a sharded batch every device computes the same EMA update.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bridle_jax.models import bridle
from bridle_jax.models import quantizer
from bridle_jax.train import optim
from bridle_jax.train.state import GROUPS, Models, TrainState, group_params


def _masked_prediction(models: Models, params, x, codes, rng):
  """Encoder on visible patches, decoder on all; CE against codes at masked patches."""
  mask_rng, dropout_rng = jax.random.split(rng)
  features, mask, ids_restore = models.encoder.apply(
      {"params": params["encoder"]}, x, apply_mask=True, rngs={"mask": mask_rng})
  logits = models.decoder.apply({"params": params["decoder"]}, features, ids_restore,
                                deterministic=False, rngs={"dropout": dropout_rng})
  spec = models.quantizer
  loss, aux = bridle.encoder_loss(logits, codes, mask, spec.num_codebooks, spec.codebook_size)
  return loss, {"accuracy": aux["acc_per_codebook"].mean()}


def _teacher_features(models: Models, params, x):
  """The encoder's final-norm features of the unmasked input, as a fixed target."""
  features, _, _ = models.encoder.apply({"params": params["encoder"]}, x, apply_mask=False)
  return jax.lax.stop_gradient(features)


def _estimate(models: Models, params, codebooks, x):
  """Tokenizer -> quantizer -> estimator; returns (codes, z_q prediction, cb loss, stats).

  The quantizer runs in training mode for z_q, the loss and the stats; the codes (the
  joint phase's encoder targets) come from its eval-mode lookup, as the reference's
  targets do (taken before the step's EMA). Unused in the tokenizer phase, XLA drops them.
  """
  z = models.tokenizer.apply({"params": params["tokenizer"]}, x, cold_start=False)
  z_q, _, losses, stats = quantizer.quantize(models.quantizer, codebooks, z, training=True)
  codes = quantizer.quantize(models.quantizer, codebooks, z)[1]
  prediction = models.estimator.apply({"params": params["estimator"]}, z_q)
  return codes, prediction, losses.mean(), stats


def tokenizer_codes(models: Models, params, codebooks, x, *, cold_start: bool):
  """The frozen tokenizer's codes of x (B, L, S * soft_code) and their stats."""
  z = models.tokenizer.apply({"params": params["tokenizer"]}, x, cold_start=cold_start)
  _, codes, _, stats = quantizer.quantize(models.quantizer, codebooks, z)
  return codes, stats


def encoder_phase_loss(models: Models, params, codebooks, x, rng, *, cold_start: bool,
                       codes=None):
  """Masked prediction of the frozen tokenizer's codes (`codes` when given: reused ones)."""
  if codes is None:
    codes, stats = tokenizer_codes(models, params, codebooks, x, cold_start=cold_start)
  else:
    stats = quantizer.stats_of_codes(models.quantizer, codes)
  loss, metrics = _masked_prediction(models, params, x, codes, rng)
  return loss, (metrics, stats)


def tokenizer_phase_loss(models: Models, params, codebooks, x, rng):
  """Cosine loss of the estimator against the frozen encoder, plus the codebook loss."""
  del rng
  teacher = _teacher_features(models, params, x)
  _, prediction, codebook_loss, stats = _estimate(models, params, codebooks, x)
  cosine = bridle.cosine_loss(prediction, teacher)
  return cosine + codebook_loss, ({"cosine": cosine, "codebook_loss": codebook_loss}, stats)


def joint_phase_loss(models: Models, params, codebooks, x, rng, *, with_tokenizer: bool,
                     ratio: float):
  """Encoder loss on the tokenizer's current codes, plus ratio x tokenizer loss when due."""
  if not with_tokenizer:
    return encoder_phase_loss(models, params, codebooks, x, rng, cold_start=False)
  codes, prediction, codebook_loss, stats = _estimate(models, params, codebooks, x)
  encoder_loss, metrics = _masked_prediction(models, params, x, jax.lax.stop_gradient(codes), rng)
  cosine = bridle.cosine_loss(prediction, _teacher_features(models, params, x))
  loss = bridle.joint_loss(encoder_loss, cosine + codebook_loss, ratio)
  metrics.update(encoder_loss=encoder_loss, cosine=cosine, codebook_loss=codebook_loss)
  return loss, (metrics, stats)


def _split_micro_batches(batch, accum: int):
  """(B, ...) -> (accum, B / accum, ...), micro-batch j holding rows j, j + accum, ...

  Interleaving keeps every micro-batch spread over all data-parallel devices.
  """
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)


def train_step(state: TrainState, batch: dict, schedule: optim.WarmupCosine, *, models: Models,
               loss_fn: Callable, groups: tuple[str, ...], tx: optax.GradientTransformation,
               grad_accum: int, update_codebooks: bool):
  """One optimizer step: (state, batch, lr schedule) -> (state, metrics, per-code counts (S, K))."""
  rng, step_rng = jax.random.split(state.rng)
  updated = {name: state.params[name] for g in groups for name in GROUPS[g]}
  frozen = {k: v for k, v in state.params.items() if k not in updated}

  def micro_step(micro_batch, micro_rng):
    aug_rng, loss_rng = jax.random.split(micro_rng)
    x = models.features(micro_batch, aug_rng)  # SpecAugment only where data.freqm/timem > 0

    # Encoder phases may get the tokenizer's codes with the batch (driver's code reuse).
    reused = {"codes": micro_batch["codes"]} if "codes" in micro_batch else {}

    def loss_of(updated_params):
      return loss_fn(models, {**frozen, **updated_params}, state.codebooks, x, loss_rng,
                     **reused)

    (loss, (metrics, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(updated)
    return grads, {"loss": loss, **metrics}, stats

  if grad_accum == 1:
    grads, metrics, stats = micro_step(batch, step_rng)
  else:
    micro_batches = _split_micro_batches(batch, grad_accum)
    micro_rngs = jax.random.split(step_rng, grad_accum)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        micro_step, jax.tree.map(lambda x: x[0], micro_batches), micro_rngs[0]))

    def accumulate(total, inputs):
      return jax.tree.map(jnp.add, total, micro_step(*inputs)), None

    (grads, metrics, stats), _ = jax.lax.scan(accumulate, zeros, (micro_batches, micro_rngs))
    grads, metrics = jax.tree.map(lambda g: g / grad_accum, (grads, metrics))

  lr = schedule(state.step)
  params, opt_state = dict(state.params), dict(state.opt_state)
  for g in groups:
    direction, opt_state[g] = tx.update(group_params(grads, g), state.opt_state[g],
                                        group_params(state.params, g))
    params.update(optim.apply_direction(group_params(state.params, g), direction, lr))
  codebooks = state.codebooks
  if update_codebooks:
    codebooks = quantizer.ema_update(models.quantizer, codebooks, stats)
  grad_norm = optim.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  # A non-finite loss or gradient leaves params, optimizer and codebooks untouched.
  params, opt_state, codebooks = if_finite(finite, (params, opt_state, codebooks),
                                           (state.params, state.opt_state, state.codebooks))
  metrics.update(lr=lr, grad_norm=grad_norm)
  new_state = state.replace(
      step=state.step + 1, rng=rng, params=params, opt_state=opt_state, codebooks=codebooks,
      skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
  return new_state, metrics, stats.counts


def if_finite(finite, new, old):
  """`new` where the step's loss and gradient were finite, else `old` (pytrees alike)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class NonFiniteTraining(ValueError):
  """More updates than `max_nonfinite_updates` had a non-finite loss or gradient."""


def check_skipped_updates(run_id: str, skipped: int, limit: int) -> None:
  """Raises NonFiniteTraining once more than `limit` updates of a run were skipped."""
  if skipped > limit:
    raise NonFiniteTraining(
        f"{run_id}: {skipped} updates had a non-finite loss or gradient "
        f"(max_nonfinite_updates={limit}); stopped, the last checkpoint holds the last good "
        "state")


def codes_step(state: TrainState, batch: dict, *, models: Models, cold_start: bool):
  """Tokenizer codes of an unaugmented batch, for an encoder phase that reuses them."""
  x = models.features(batch, None)
  return tokenizer_codes(models, state.params, state.codebooks, x, cold_start=cold_start)[0]


def prepare_codebooks(state: TrainState, batch: dict, *, models: Models, cold_start: bool,
                      kmeans: bool = True):
  """k-means initialisation (when `kmeans` and the spec asks) and a dead-code restart.

  Run on a phase's first batch; with kmeans=False, the periodic restart of
  `<phase>.restart_unused_every`. The cold-start tokenizer gets no restart: the
  reference's cold-start encoder script turns it off.
  """
  spec = models.quantizer
  rng, kmeans_rng, restart_rng = jax.random.split(state.rng, 3)
  x = models.features(batch, None)
  z = models.tokenizer.apply({"params": state.params["tokenizer"]}, x, cold_start=cold_start)
  codebooks = state.codebooks
  if kmeans and spec.kmeans_init:
    codebooks = quantizer.kmeans_init(spec, codebooks, z, kmeans_rng)
  if spec.restart_unused and not cold_start:
    codebooks = quantizer.restart_unused(spec, codebooks, z, restart_rng)
  return state.replace(codebooks=codebooks, rng=rng)


PHASE_GROUPS = {"encoder": ("encoder",), "tokenizer": ("tokenizer",),
                "joint": ("encoder", "tokenizer")}


def phase_step(models: Models, kind: str, phase_config, tx, *, cold_start: bool = False,
               with_tokenizer: bool = True):
  """The step function (state, batch, schedule) of a phase kind, its keyword arguments bound."""
  if kind == "encoder":
    loss_fn = functools.partial(encoder_phase_loss, cold_start=cold_start)
    groups, update_codebooks = PHASE_GROUPS["encoder"], False
  elif kind == "tokenizer":
    loss_fn, groups, update_codebooks = tokenizer_phase_loss, PHASE_GROUPS["tokenizer"], True
  else:
    loss_fn = functools.partial(joint_phase_loss, with_tokenizer=with_tokenizer,
                                ratio=phase_config.tokenizer_loss_ratio)
    groups = PHASE_GROUPS["joint"] if with_tokenizer else PHASE_GROUPS["encoder"]
    update_codebooks = with_tokenizer
  return functools.partial(
      train_step, models=models, loss_fn=loss_fn, groups=groups, tx=tx,
      grad_accum=phase_config.grad_accum, update_codebooks=update_codebooks)
