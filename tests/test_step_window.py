"""The train loop's bound on how far the host runs ahead of the device."""
import jax
import jax.numpy as jnp

from bridle_jax import driver


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
