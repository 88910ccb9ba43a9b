"""Per-phase checkpoints (train state + data-iterator state) and the run's progress file.

`PhaseCheckpointer` wraps one `ocp.CheckpointManager` over `WORKDIR/checkpoints/<phase_id>/`.
A checkpoint step directory holds two items:

  state/  the train-state pytree (`StandardSave`), written collectively: each process
          writes the shards it owns, and restores straight into the shardings of the
          abstract state it is given, whatever mesh the checkpoint was saved from.
  data/   one `process_<index>-of-<count>.json` per process: that host's grain iterator
          state. Orbax's `JsonSave` writes only on the primary host, so it would keep
          process 0's state alone; `_HostDataHandler` writes from every process instead
          (the scheme of grain's own orbax handler). Orbax creates the item directory on
          the primary host and waits for it on all processes before running a handler's
          `save`, and commits the step (rename of the temporary directory) only after
          every process has finished, so a committed step holds every host's file.

Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it once complete;
steps are listed from committed directories only, so a save cut short (crash, SIGKILL)
is never reported or restored, and its leftover is removed when a manager next opens
the directory.
"""
import contextlib
import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from bridle_jax import files

PROGRESS_FILE = "progress.json"
_INT_KEYS = "__int_keys__"


def _encode_json(value: Any) -> Any:
  """Makes `value` JSON-safe without loss: int-keyed dicts (grain's `future_states`) are
  stored as [key, value] pairs, which plain `json` would turn into string keys."""
  if isinstance(value, dict):
    if all(isinstance(key, str) for key in value):
      return {key: _encode_json(item) for key, item in value.items()}
    if all(isinstance(key, int) for key in value):
      return {_INT_KEYS: [[key, _encode_json(item)] for key, item in value.items()]}
    raise TypeError(f"data state dict keys must be all str or all int: {list(value)}")
  if isinstance(value, (list, tuple)):
    return [_encode_json(item) for item in value]
  return value


def _decode_json(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {_INT_KEYS}:
      return {key: _decode_json(item) for key, item in value[_INT_KEYS]}
    return {key: _decode_json(item) for key, item in value.items()}
  if isinstance(value, list):
    return [_decode_json(item) for item in value]
  return value


def save_replicated_arrays_from_one_device_on_cpu() -> None:
  """On the CPU backend, has orbax write a replicated array from one device rather than
  a slice from each of its replicas. CPU devices share the host's memory, so the slices
  save nothing and cost a small compiled program per array and device (with 8 devices,
  11 s of a 50-step demo phase). The files are the same. Elsewhere it does nothing."""
  if jax.default_backend() != "cpu":
    return
  from orbax.checkpoint._src.metadata import array_metadata_store  # private: loaded on CPU only
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()),
      override=True)


def _host_file_name() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _HostDataHandler(ocp.CheckpointHandler):
  """Saves and restores this process's data state as its own JSON file."""

  def save(self, directory: epath.Path, args: "_HostDataSave"):
    (directory / _host_file_name()).write_text(args.text)

  def restore(self, directory: epath.Path, args: "_HostDataRestore | None" = None):
    del args
    path = directory / _host_file_name()
    if not path.exists():  # saved with another process count
      return None
    return _decode_json(json.loads(path.read_text()))


@ocp.args.register_with_handler(_HostDataHandler, for_save=True)
@dataclasses.dataclass
class _HostDataSave(ocp.args.CheckpointArgs):
  text: str  # this host's encoded data state ("null" when there is none)


@ocp.args.register_with_handler(_HostDataHandler, for_restore=True)
@dataclasses.dataclass
class _HostDataRestore(ocp.args.CheckpointArgs):
  pass


class PhaseCheckpointer:
  """Checkpoints of one phase: every `save_every` steps (or forced), the last `keep` kept.

  All processes must call `save`, `restore`, `wait` and `close` together. With
  `async_save`, `save` returns once the arrays are copied off the devices (so the state
  may be donated right after) and the files are written in the background.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
    # orbax refuses relative paths; a workdir given as `runs/x` is taken from the cwd.
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    save_replicated_arrays_from_one_device_on_cpu()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": _HostDataHandler()})

  def should_save(self, step: int) -> bool:
    """Whether `step` is a periodic save point (a positive multiple of `save_every`)."""
    return step > 0 and step % self.save_every == 0

  def save(self, step: int, state: Any, data_state: dict | None, *, force: bool = False) -> bool:
    """Saves `state` and this host's `data_state` at `step` if `should_save(step)` or
    `force`; returns whether a save started (False also when `step` is already saved)."""
    if not (force or self.should_save(step)) or step in self._manager.all_steps():
      return False
    data_text = json.dumps(_encode_json(data_state))
    return self._manager.save(
        step, force=True,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=_HostDataSave(data_text)))

  def latest_step(self) -> int | None:
    """The newest committed step, or None; waits for an in-flight save to commit first."""
    self._manager.wait_until_finished()
    return self._manager.latest_step()

  def saved_shapes(self, step: int) -> Any:
    """The state tree of `step` as saved: leaves with `.shape` and `.dtype`."""
    return dict(ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(step) / "state"))

  def restore(self, abstract_state: Any, step: int | None = None, *,
              with_data: bool = True) -> tuple[Any, dict | None]:
    """Restores `step` (default: the latest) as (state, this host's data state or None).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings; the restored
    arrays come back in those shardings. The data state is None when `with_data` is False,
    or (with a warning) when the checkpoint was saved by another number of processes.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if with_data:
      items["data"] = _HostDataRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    data_state = restored.data if with_data else None
    if with_data and data_state is None:
      logging.warning("%s: checkpoint %d holds no data position for this host layout; the "
                      "data stream restarts from its beginning", self.directory, step)
    return restored.state, data_state

  def wait(self):
    """Blocks until in-flight saves are committed."""
    self._manager.wait_until_finished()

  @contextlib.contextmanager
  def commits_on_error(self):
    """When the block raises, a save it started still commits before the error goes on.

    Single-process jobs only: in a multi-process job the other processes may never reach
    the save's barrier, so there the save in flight is dropped (as after a kill).
    """
    try:
      yield
    except BaseException:
      if jax.process_count() == 1:
        self.wait()
      raise

  def close(self):
    """Waits for in-flight saves and releases the manager."""
    self._manager.close()


def read_progress(workdir: str) -> dict:
  """The run's progress dict from `WORKDIR/progress.json`; {} when the file is absent."""
  path = os.path.join(workdir, PROGRESS_FILE)
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return {}
  try:
    progress = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"corrupt progress file {path}: {e}") from e
  if not isinstance(progress, dict):
    raise ValueError(f"corrupt progress file {path}: expected a JSON object, got "
                     f"{type(progress).__name__}")
  return progress


def write_progress(workdir: str, progress: dict):
  """Atomically replaces `WORKDIR/progress.json` (process 0 only; others return)."""
  if jax.process_index() != 0:
    return
  text = json.dumps(progress, indent=2, sort_keys=True)
  os.makedirs(workdir, exist_ok=True)
  files.write_atomic(os.path.join(workdir, PROGRESS_FILE), text.encode("utf-8"), durable=True)
