"""The train loop: how far the host runs ahead of the device, and when it stops for preemption."""
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


def test_preemption_sync_point_ids_keep_growing_across_phases(monkeypatch):
  reported = []
  monkeypatch.setattr(driver.jax, "process_count", lambda: 2)
  monkeypatch.setattr(driver.multihost_utils, "reached_preemption_sync_point",
                      lambda n: reported.append(n) or n == 7)
  notice = driver.PreemptionNotice()
  first_phase = [notice.requested() for _ in range(5)]
  second_phase = [notice.requested() for _ in range(3)]  # its steps restart at 1
  assert reported == list(range(1, 9))
  assert not any(first_phase) and second_phase == [False, True, False]
