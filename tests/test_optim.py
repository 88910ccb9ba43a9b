"""Optimizer pieces and the generic train step: schedule, decay groups, accumulation, clipping."""
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict

from bridle_jax.models import quantizer
from bridle_jax.train import optim
from bridle_jax.train import state as state_lib
from bridle_jax.train import steps


def _phase(**overrides):
  values = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, clip_grad=0.0, grad_accum=1)
  values.update(overrides)
  return config_dict.ConfigDict(values)


def test_warmup_cosine_matches_the_reference_formula():
  schedule = optim.warmup_cosine(1e-3, 1e-5, warmup_steps=10, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
  assert float(schedule(110)) == pytest.approx(1e-5)


def test_decay_mask_skips_biases_vectors_and_the_cold_start_projection_but_decays_tokens():
  params = {"cls_token": jnp.zeros((1, 1, 8)), "norm": {"scale": jnp.zeros(8), "bias": jnp.zeros(8)},
            "attn": {"qkv": {"kernel": jnp.zeros((8, 3, 2, 4)), "bias": jnp.zeros((3, 2, 4))}},
            "tau": jnp.zeros(2), "cold_start_encoder": {"kernel": jnp.zeros((8, 4))}}
  mask = optim.decay_mask(params)
  assert mask == {"cls_token": True, "norm": {"scale": False, "bias": False},
                  "attn": {"qkv": {"kernel": True, "bias": False}}, "tau": False,
                  "cold_start_encoder": {"kernel": False}}


def _linear_problem():
  """A train step over a least-squares loss, the step's generic machinery intact."""
  spec = quantizer.QuantizerSpec(num_codebooks=1, codebook_size=2, code_dim=2)
  models = types.SimpleNamespace(features=lambda batch, rng: batch["waveform"], quantizer=spec)

  def loss_fn(models, params, codebooks, x, rng):
    del models, codebooks, rng
    prediction = x @ params["encoder"]["w"]
    loss = jnp.mean((prediction - x.sum(-1, keepdims=True)) ** 2)
    zeros = quantizer.CodebookStats(counts=jnp.zeros((1, 2)), sums=jnp.zeros((1, 2, 2)))
    return loss, ({}, zeros)

  params = {"encoder": {"w": jnp.zeros((6, 1))}, "decoder": {}, "tokenizer": {}, "estimator": {}}
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))
  return models, loss_fn, params, {"waveform": x, "valid_frames": jnp.zeros(8, jnp.int32)}


def _one_step(phase_config):
  models, loss_fn, params, batch = _linear_problem()
  tx = optim.adamw_direction(phase_config)
  state = state_lib.new_state(params, quantizer.init(models.quantizer, jax.random.PRNGKey(0)),
                              ("encoder",), tx, jax.random.PRNGKey(0))
  step = functools.partial(steps.train_step, models=models, loss_fn=loss_fn, groups=("encoder",),
                           tx=tx, grad_accum=phase_config.grad_accum, update_codebooks=False)
  return jax.jit(step)(state, batch, optim.warmup_cosine(0.1, 0.1, 0, 1))


def test_gradient_accumulation_equals_the_full_batch_step():
  full, full_metrics, _ = _one_step(_phase())
  accumulated, accum_metrics, _ = _one_step(_phase(grad_accum=4))
  np.testing.assert_allclose(accumulated.params["encoder"]["w"], full.params["encoder"]["w"],
                             rtol=1e-5)
  np.testing.assert_allclose(accum_metrics["loss"], full_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(accum_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)


def test_clipping_bounds_the_update_direction():
  # A huge Adam eps makes the update proportional to the (clipped) gradient.
  unclipped, _, _ = _one_step(_phase(eps=1e3))
  clipped, _, _ = _one_step(_phase(eps=1e3, clip_grad=1e-3))
  step_unclipped = np.abs(np.asarray(unclipped.params["encoder"]["w"])).max()
  step_clipped = np.abs(np.asarray(clipped.params["encoder"]["w"])).max()
  assert step_clipped < step_unclipped * 0.01


def test_weight_decay_shrinks_kernels():
  models, loss_fn, params, batch = _linear_problem()
  params["encoder"]["w"] = jnp.ones((6, 1))
  tx = optim.adamw_direction(_phase(weight_decay=0.5))
  direction, _ = tx.update(jax.tree.map(jnp.zeros_like, params["encoder"]),
                           tx.init(params["encoder"]), params["encoder"])
  np.testing.assert_allclose(direction["w"], 0.5 * np.ones((6, 1)))
