"""Stopping a training loop cleanly on SIGTERM, the preemption notice of TPU and cloud
schedulers: the loop saves a checkpoint and raises `Preempted`; the CLI exits 143."""
import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved and rerunning the command resumes."""


class PreemptionNotice:
  """Turns SIGTERM into a flag that the train loop polls once per step.

  In a multi-process job jax's own SIGTERM notifier (installed by
  `jax.distributed.initialize`) tells the coordinator, and the preemption sync point makes
  every process stop at the same step; a Python handler would hide the signal from it.
  """

  def __init__(self):
    self._received = False
    self._checks = 0
    single = jax.process_count() == 1
    if single and threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step")
    self._received = True

  def requested(self) -> bool:
    """Whether to save and stop now; every process calls this once per train step.

    The sync point is given a count of these calls that only grows over the process's
    life: jax stops every process at the call after the highest one reported when the
    notice came, which a step count restarting in each phase could never reach.
    """
    self._checks += 1
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(self._checks)
    return self._received

  def stop_if_requested(self, what: str) -> None:
    """Raises `Preempted` ("<what>; rerun ...") if SIGTERM came while no step ran (between
    runs, or while one is set up): the checkpoints already hold everything."""
    if self.requested():
      raise Preempted(f"{what}; rerun the same command to resume")


def stop_message(run_id: str, step: int, total: int) -> str:
  return (f"{run_id}: preempted at step {step}/{total}; checkpoint saved, rerun the same "
          "command to resume")
