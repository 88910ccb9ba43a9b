"""The train loop: how far the host runs ahead of the device, when it stops for preemption,
and the state it starts from (its random key, one trace of the model's initialisation)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bridle_jax import driver
from bridle_jax.train import preemption
from bridle_jax.train import state as state_lib
from configs import audio as audio_config


@jax.jit
def _slow_step(x):
  return jax.lax.fori_loop(0, 50, lambda i, v: jnp.tanh(v @ v), x)


def test_host_waits_once_more_than_depth_steps_are_queued():
  x = jnp.full((256, 256), 0.01)
  _slow_step(x).block_until_ready()  # compiled outside the loop
  window = driver.StepWindow(depth=2)
  outputs = []
  for _ in range(8):
    outputs.append(_slow_step(x))
    window.push(outputs[-1])
    assert all(out.is_ready() for out in outputs[:-2])


def test_preemption_sync_point_ids_keep_growing_across_phases(monkeypatch):
  reported = []
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "reached_preemption_sync_point",
                      lambda n: reported.append(n) or n == 7)
  notice = preemption.PreemptionNotice()
  first_phase = [notice.requested() for _ in range(5)]
  second_phase = [notice.requested() for _ in range(3)]  # its steps restart at 1
  assert reported == list(range(1, 9))
  assert not any(first_phase) and second_phase == [False, True, False]


def test_a_fresh_state_keeps_a_key_that_initialised_nothing():
  config = audio_config.get_config("demo")
  models = state_lib.build_models(config)
  rng = jax.random.PRNGKey(0)
  state = state_lib.fresh_state_fn(models, ("encoder",), optax.sgd(0.1))(rng)
  used = jax.random.split(rng)  # keys an init could have taken from `rng`
  assert not any(bool((state.rng == key).all()) for key in (rng, *used))


def test_the_phases_of_a_run_trace_the_model_initialisation_once(monkeypatch):
  """A run's abstract and initial states of every phase reuse one trace of the four
  modules' init (each trace runs their forward passes: about a second per phase)."""
  config = audio_config.get_config("demo")
  models = state_lib.build_models(config)
  inits = []
  module_init = nn.Module.init
  monkeypatch.setattr(nn.Module, "init",
                      lambda self, *a, **k: inits.append(type(self).__name__) or
                      module_init(self, *a, **k))
  rng = jax.random.PRNGKey(0)
  for groups in (("encoder",), ("tokenizer",), ("encoder", "tokenizer")):
    fresh = state_lib.fresh_state_fn(models, groups, optax.adamw(1e-3))
    jax.eval_shape(fresh, rng)
    jax.jit(fresh).lower(rng)
  assert sorted(inits) == ["Decoder", "Encoder", "Estimator", "Tokenizer"]
