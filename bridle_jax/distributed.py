"""Joining a multi-process job (Cloud TPU pod slices, multi-node GPU, several CPU processes).

Every process of the job runs the same command with `--distributed`; this must happen
before anything touches a device. On Cloud TPU and under SLURM or Open MPI, jax finds
the coordinator, the process count and this process's id itself; elsewhere pass them.
"""
import jax
from absl import logging


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Connects this process to the job's coordinator; logs its place in the job."""
  # CPU processes exchange data over gloo; accelerator backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  logging.info("process %d of %d: %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
