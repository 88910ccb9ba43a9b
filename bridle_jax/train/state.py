"""The model bundle built from a config, and the train state pytree.

Parameters live in one dict with four modules: 'encoder' and 'decoder' (group
'encoder'), 'tokenizer' and 'estimator' (group 'tokenizer'). A phase updates one or
both groups; the optimizer state holds one entry per updated group. The quantizer's
codebooks travel as explicit state next to the parameters.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bridle_jax.data import inputs
from bridle_jax.models import decoder as decoder_lib
from bridle_jax.models import quantizer
from bridle_jax.models import tokenizer as tokenizer_lib
from bridle_jax.models import vit

GROUPS = {"encoder": ("encoder", "decoder"), "tokenizer": ("tokenizer", "estimator")}
MODULES = ("encoder", "decoder", "tokenizer", "estimator")


@dataclasses.dataclass(frozen=True)
class Models:
  """The four Flax modules, the quantizer spec and the on-device front end."""
  encoder: nn.Module
  decoder: nn.Module
  tokenizer: nn.Module
  estimator: nn.Module
  quantizer: quantizer.QuantizerSpec
  features: Callable[[dict, Any], jax.Array]  # (batch, rng or None) -> (B, *input_shape)
  input_shape: tuple[int, ...]  # (frames, mel bins) or (size, size, 3)


def build_models(config) -> Models:
  """Modules sized by `config.model` for the `config.data` input."""
  data, model = config.data, config.model
  grid = inputs.patch_grid(data, model.patch_size)
  spec = quantizer.quantizer_spec_from_config(model.quantizer)
  num_tokens = spec.codebook_size * spec.num_codebooks * spec.soft_code
  return Models(
      encoder=vit.encoder_from_config(model, grid),
      decoder=decoder_lib.decoder_from_config(model, grid, num_tokens),
      tokenizer=tokenizer_lib.tokenizer_from_config(model, grid),
      estimator=tokenizer_lib.estimator_from_config(model, grid),
      quantizer=spec, features=inputs.device_features(data),
      input_shape=inputs.input_shape(data))


@functools.partial(jax.jit, static_argnums=0)
def init_params(models: Models, rng: jax.Array) -> dict:
  """Fresh parameters of all four modules, with their logical-axis annotations. Jitted
  so that the programs built around it (abstract and initial states of every phase)
  reuse its traced forward passes instead of tracing them again."""
  r_enc, r_dec, r_tok, r_est, r_mask = jax.random.split(rng, 5)
  x = jnp.zeros((1, *models.input_shape), jnp.float32)
  encoder = models.encoder.init({"params": r_enc, "mask": r_mask}, x, apply_mask=True)
  features, _, ids_restore = models.encoder.apply(encoder, x, apply_mask=True,
                                                  rngs={"mask": r_mask})
  decoder = models.decoder.init({"params": r_dec}, features, ids_restore)
  tokenizer = models.tokenizer.init({"params": r_tok}, x)
  z = jnp.zeros((1, ids_restore.shape[1], models.quantizer.code_dim), jnp.float32)
  estimator = models.estimator.init({"params": r_est}, z)
  return {"encoder": encoder["params"], "decoder": decoder["params"],
          "tokenizer": tokenizer["params"], "estimator": estimator["params"]}


@flax.struct.dataclass
class TrainState:
  """Everything a phase's step reads and returns."""
  step: jax.Array                        # optimizer steps taken in this phase
  params: dict                           # module name -> params
  opt_state: dict                        # group name -> optax state of that group's params
  codebooks: quantizer.CodebookState
  rng: jax.Array
  skipped_updates: jax.Array             # steps whose loss or gradient was not finite


def group_params(params: dict, group: str) -> dict:
  return {name: params[name] for name in GROUPS[group]}


def new_state(params: dict, codebooks: quantizer.CodebookState, groups: tuple[str, ...],
              tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A phase's initial state: step 0 and a fresh optimizer for the updated groups."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state={g: tx.init(group_params(params, g)) for g in groups},
      codebooks=codebooks, rng=rng, skipped_updates=jnp.zeros((), jnp.int32))


def fresh_state_fn(models: Models, groups: tuple[str, ...], tx: optax.GradientTransformation):
  """rng -> the annotated initial state of a phase with fresh params and codebooks."""
  def fresh(rng):
    params_rng, codebook_rng, state_rng = jax.random.split(rng, 3)
    return new_state(init_params(models, params_rng),
                     quantizer.init(models.quantizer, codebook_rng), groups, tx, state_rng)
  return fresh


def handoff_tree(state: TrainState) -> dict:
  """What one phase passes to the next (and what exports read): params and codebooks."""
  return {"params": state.params, "codebooks": state.codebooks}
