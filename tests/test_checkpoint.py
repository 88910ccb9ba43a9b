"""Phase checkpoints: exact round trips, retention, async commits, resharding on restore,
interrupted saves, the progress file and grain iterator state."""
import copy
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bridle_jax import workdir as workdir_lib
from bridle_jax.train import checkpoint
from configs import audio as audio_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class Codebooks:
  embeddings: jax.Array
  usage: jax.Array


@flax.struct.dataclass
class TinyState:
  step: jax.Array
  params: dict
  opt_state: Any
  codebooks: Codebooks
  rng: jax.Array


def _tiny_state(seed: int = 0) -> TinyState:
  """A state after one optimizer update, so moments and counts are non-trivial."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = {"dense": {"kernel": jax.random.normal(keys[0], (8, 4)),
                      "bias": jax.random.normal(keys[1], (4,))},
            "scale": jnp.full((3,), 0.5, jnp.bfloat16)}
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return TinyState(
      step=jnp.array(7 + seed, jnp.int32), params=params, opt_state=opt_state,
      codebooks=Codebooks(jax.random.normal(keys[2], (16, 4)), jnp.arange(16, dtype=jnp.int32)),
      rng=keys[3])


def _abstract(state, sharding_of=None):
  """ShapeDtypeStructs with shardings (default: replicated on the first device)."""
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding_of(x) if sharding_of else default),
      state)


def _assert_same_tree(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path))


def _committed_steps(directory) -> list[int]:
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def test_round_trip_restores_every_leaf_and_data_state(tmp_path):
  state = _tiny_state()
  data_state = {"next_index": 12, "future_states": {3: {"next_index": 2}},
                "exhausted": [0, 1], "name": "train", "missing": None}
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=1, keep=2)
  assert ckpt.save(7, state, data_state)
  restored, restored_data = ckpt.restore(_abstract(state))
  ckpt.close()
  _assert_same_tree(restored, state)
  assert int(restored.opt_state[0].count) == 1
  assert restored_data == data_state


def test_a_relative_directory_is_taken_from_the_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = _tiny_state()
  ckpt = checkpoint.PhaseCheckpointer("runs/x/checkpoints/p1", save_every=1, keep=1,
                                      async_save=False)
  assert ckpt.save(2, state, {"next_index": 3})
  ckpt.close()
  assert _committed_steps(tmp_path / "runs/x/checkpoints/p1") == [2]
  again = checkpoint.PhaseCheckpointer("runs/x/checkpoints/p1", save_every=1, keep=1)
  restored, _ = again.restore(_abstract(state))
  again.close()
  _assert_same_tree(restored, state)


def test_data_state_of_another_process_layout_is_reported_missing(tmp_path, caplog):
  state = _tiny_state()
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=1, keep=2, async_save=False)
  assert ckpt.save(3, state, {"next_index": 4})
  _, data_state = ckpt.restore(_abstract(state), with_data=False)  # final checkpoints
  assert data_state is None and "data position" not in caplog.text
  for path in (tmp_path / "3" / "data").iterdir():  # as if saved by another process count
    path.rename(path.with_name("process_0-of-2.json"))
  restored, data_state = ckpt.restore(_abstract(state))
  ckpt.close()
  _assert_same_tree(restored, state)
  assert data_state is None and "holds no data position for this host layout" in caplog.text


def test_keep_should_save_and_force(tmp_path):
  state = _tiny_state()
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=2, keep=2, async_save=False)
  assert [ckpt.should_save(s) for s in range(5)] == [False, False, True, False, True]
  assert ckpt.latest_step() is None
  assert not ckpt.save(1, state, None)
  for step in (2, 3, 4, 6):
    ckpt.save(step, state, {"next_index": step})
  assert _committed_steps(tmp_path) == [4, 6]
  assert ckpt.save(7, state, None, force=True)
  assert not ckpt.save(7, state, None, force=True)  # already saved
  assert _committed_steps(tmp_path) == [6, 7]
  assert ckpt.latest_step() == 7
  assert ckpt.restore(_abstract(state))[1] is None
  assert ckpt.restore(_abstract(state), step=6)[1] == {"next_index": 6}
  ckpt.close()


def test_async_save_is_complete_after_wait(tmp_path):
  state = _tiny_state()
  expected = jax.tree.map(np.asarray, state)
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=5, keep=3)
  assert ckpt.save(5, state, {"next_index": 5})
  for leaf in jax.tree.leaves(state):  # what donating the state to the next step does
    leaf.delete()
  ckpt.wait()
  assert _committed_steps(tmp_path) == [5]
  assert not [name for name in os.listdir(tmp_path) if "tmp" in name]

  reopened = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=5, keep=3)
  assert reopened.latest_step() == 5
  restored, data_state = reopened.restore(_abstract(expected))
  _assert_same_tree(restored, expected)
  assert data_state == {"next_index": 5}
  reopened.close()
  ckpt.close()


def test_restore_onto_eight_device_mesh(tmp_path):
  assert jax.device_count() == 8
  state = _tiny_state()  # every array on a single device
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=1, keep=1)
  ckpt.save(1, state, None)
  ckpt.wait()

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  by_rows = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  abstract = _abstract(state, lambda x: by_rows if x.ndim == 2 and x.shape[0] % 8 == 0
                       else replicated)
  restored, _ = ckpt.restore(abstract)
  ckpt.close()
  _assert_same_tree(restored, state)
  kernel = restored.params["dense"]["kernel"]
  assert kernel.sharding == by_rows
  assert {shard.data.shape for shard in kernel.addressable_shards} == {(1, 4)}
  assert restored.opt_state[0].mu["dense"]["kernel"].sharding == by_rows
  assert restored.codebooks.embeddings.sharding == by_rows
  assert restored.step.sharding == replicated


def test_replicated_state_saves_without_compiling_a_program_per_device(tmp_path, caplog):
  """On CPU, a state replicated over the 8 devices is written from one of them: the save
  compiles nothing (orbax's per-replica slices would compile one program per array and
  device), and the files restore to the same values."""
  replicated = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                             PartitionSpec())
  state = jax.device_put(_tiny_state(seed=3), replicated)
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=1, keep=1, async_save=False)
  with caplog.at_level(logging.WARNING), jax.log_compiles():
    assert ckpt.save(1, state, None)
  compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert not compiled, compiled
  restored, _ = ckpt.restore(_abstract(state, lambda x: replicated))
  ckpt.close()
  _assert_same_tree(restored, state)


def test_leftover_temporary_directory_is_ignored(tmp_path):
  state = _tiny_state()
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=1, keep=3)
  ckpt.save(1, state, {"next_index": 1})
  ckpt.close()
  # What a save of step 2 cut short by a crash leaves behind: a complete-looking
  # step under orbax's temporary name.
  leftover = tmp_path / "2.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "1", leftover)

  reopened = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=1, keep=3)
  assert reopened.latest_step() == 1
  restored, data_state = reopened.restore(_abstract(state))
  _assert_same_tree(restored, state)
  assert data_state == {"next_index": 1}
  assert reopened.save(2, _tiny_state(seed=1), None)
  reopened.close()
  assert _committed_steps(tmp_path) == [1, 2]
  assert not leftover.exists()


_KILLED_SAVER = textwrap.dedent("""
    import os, signal, sys
    import jax.numpy as jnp
    from bridle_jax.train import checkpoint

    directory, kill_point = sys.argv[1], sys.argv[2]
    ckpt = checkpoint.PhaseCheckpointer(directory, save_every=1, keep=3)
    def state(fill):
      return {"w%d" % i: jnp.full((512, 1024), fill + i, jnp.float32) for i in range(8)}
    ckpt.save(1, state(1.0), {"next_index": 1})
    ckpt.wait()
    if kill_point == "mid_save":
      def die(self, directory, args):
        os.kill(os.getpid(), signal.SIGKILL)
      checkpoint._HostDataHandler.save = die
    ckpt.save(2, state(2.0), {"next_index": 2})
    os.kill(os.getpid(), signal.SIGKILL)
    """)


@pytest.mark.parametrize("kill_point", ["mid_save", "after_async_return"])
def test_killed_save_is_never_reported(tmp_path, kill_point):
  """SIGKILL while step 2 is being written (from inside the save, or while the async
  write runs): step 2 is reported only if fully committed, and step 1 always restores."""
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _KILLED_SAVER, str(tmp_path), kill_point],
                          env=env, capture_output=True, timeout=60, check=False)
  assert result.returncode == -9, result.stderr.decode()[-2000:]
  interrupted = any("tmp" in name for name in os.listdir(tmp_path))
  if kill_point == "mid_save":
    assert interrupted

  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=1, keep=3)
  latest = ckpt.latest_step()
  assert latest == (1 if interrupted else 2)
  abstract = _abstract({f"w{i}": jnp.zeros((512, 1024), jnp.float32) for i in range(8)})
  for step in range(1, latest + 1):
    restored, data_state = ckpt.restore(abstract, step=step)
    assert data_state == {"next_index": step}
    for i in range(8):
      np.testing.assert_array_equal(np.asarray(restored[f"w{i}"]), step + i)
  ckpt.close()


def test_progress_file_atomic_write_and_read(tmp_path):
  workdir = str(tmp_path / "run")
  assert checkpoint.read_progress(workdir) == {}
  checkpoint.write_progress(workdir, {"phase": "r1_encoder", "done": []})
  checkpoint.write_progress(workdir, {"phase": "r1_tokenizer", "done": ["r1_encoder"]})
  assert checkpoint.read_progress(workdir) == {"phase": "r1_tokenizer", "done": ["r1_encoder"]}
  with pytest.raises(TypeError):
    checkpoint.write_progress(workdir, {"phase": object()})
  assert checkpoint.read_progress(workdir)["phase"] == "r1_tokenizer"
  assert os.listdir(workdir) == ["progress.json"]


@pytest.mark.parametrize("content", ['{"phase": "r1_enc', "[1, 2]"])
def test_corrupt_progress_file_error_names_the_file(tmp_path, content):
  path = tmp_path / "progress.json"
  path.write_text(content)
  with pytest.raises(ValueError, match=str(path)):
    checkpoint.read_progress(str(tmp_path))


def test_grain_iterator_state_round_trip(tmp_path):
  dataset = grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset()
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  state = _tiny_state()
  ckpt = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=5, keep=1)
  ckpt.save(5, state, iterator.get_state())
  expected = [next(iterator) for _ in range(3)]
  ckpt.close()

  reopened = checkpoint.PhaseCheckpointer(str(tmp_path), save_every=5, keep=1)
  _, data_state = reopened.restore(_abstract(state))
  reopened.close()
  resumed = iter(dataset)
  resumed.set_state(data_state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed), want)
  assert not np.array_equal(expected[0], next(iter(dataset)))


def test_runs_saved_before_the_pos_table_fields_still_resume(tmp_path):
  config = audio_config.get_config("demo")
  workdir_lib.save_config(config, str(tmp_path))
  path = tmp_path / workdir_lib.CONFIG_FILE
  saved = json.loads(path.read_text())
  del saved["model"]["pos_table_frames"], saved["model"]["pos_crop"]
  path.write_text(json.dumps(saved))
  workdir_lib.check_compatible(config, str(tmp_path))
  config.model.pos_crop = "center"
  with pytest.raises(ValueError, match="model.pos_crop is 'reference' there and 'center' now"):
    workdir_lib.check_compatible(config, str(tmp_path))


def test_a_resumed_run_keeps_what_its_started_phases_trained_with(tmp_path):
  """p1 finished and p2 has a checkpoint: their settings are fixed, p3's are not."""
  config = audio_config.get_config("demo")
  config.rounds = ("encoder", "tokenizer", "joint")
  workdir = str(tmp_path)
  workdir_lib.save_config(config, workdir)
  checkpoint.write_progress(workdir, {"completed": ["p1_encoder"]})
  os.makedirs(tmp_path / "checkpoints" / "p2_tokenizer" / "4")
  workdir_lib.check_resumable(config, workdir)

  def resumes(**changes) -> bool:
    try:
      workdir_lib.check_resumable(_with(config, **changes), workdir)
    except ValueError as e:
      assert str(e).startswith(f"{workdir}: p")
      return False
    return True

  assert not resumes(**{"encoder_phase.lr": 0.5})
  assert not resumes(**{"tokenizer_phase.steps": 2})
  assert not resumes(seed=5)
  assert not resumes(**{"data.roll_mag_aug": False})
  assert not resumes(rounds=("encoder", "joint", "joint"))
  assert not resumes(init_from="/another/run")  # it decides p1's cold start
  with pytest.raises(ValueError, match=r"p2_tokenizer started with tokenizer_phase.batch_size "
                                       r"= \d+, and tokenizer_phase.batch_size is 3 now"):
    workdir_lib.check_resumable(
        _with(config, **{"tokenizer_phase.batch_size": 3}), workdir)
  assert resumes(**{"joint_phase.lr": 0.5, "joint_phase.steps": 2})
  assert resumes(rounds=("encoder", "tokenizer", "encoder"))
  assert resumes(**{"tokenizer_phase.grad_accum": 2, "encoder_phase.reuse_codes": True,
                    "data.num_workers": 0, "data.manifest": "/moved/train.json",
                    "log_every": 1, "mesh.data": 2})


def _with(config, **changes):
  changed = copy.deepcopy(config)
  changed.update_from_flattened_dict(changes)
  return changed
