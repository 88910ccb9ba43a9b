"""TensorBoard event files written without TensorFlow, read back with tensorboardX's protos."""
import os

import numpy as np
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c as reference_masked_crc32c

from bridle_jax.train import events

from event_files import read_events


def test_crc32c_matches_the_standard_check_value_and_tensorboardx():
  assert events.crc32c(b"123456789") == 0xE3069283
  rng = np.random.default_rng(0)
  for size in (0, 1, 8, 255, 4096):
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    assert events.masked_crc32c(data) == reference_masked_crc32c(data)


def test_scalars_read_back_with_their_tags_steps_and_values(tmp_path):
  writer = events.ScalarWriter(str(tmp_path / "run"))
  writer.add_scalar("p1_encoder/loss", 2.5, 1)
  writer.add_scalar("p1_encoder/lr", 1e-4, 300)
  writer.add_scalar("p1_encoder/délai", -0.125, 2**40)  # non-ASCII tag, 6-byte varint step
  writer.close()
  first, *scalars = read_events(writer.path)
  assert os.path.basename(writer.path).startswith("events.out.tfevents.")
  assert first.file_version == "brain.Event:2"
  got = [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value) for e in scalars]
  assert got == [(1, "p1_encoder/loss", 2.5), (300, "p1_encoder/lr", np.float32(1e-4)),
                 (2**40, "p1_encoder/délai", -0.125)]
  assert all(e.wall_time >= first.wall_time > 0 for e in scalars)


def test_a_resumed_writer_starts_a_new_file_that_purges_later_steps(tmp_path):
  first = events.ScalarWriter(str(tmp_path))
  first.add_scalar("loss", 1.0, 9)
  first.flush()  # left open, as by a killed run
  resumed = events.ScalarWriter(str(tmp_path), purge_step=7)
  resumed.add_scalar("loss", 0.5, 7)
  resumed.close()
  assert resumed.path != first.path and len(os.listdir(tmp_path)) == 2
  version, start, scalar = read_events(resumed.path)
  assert (version.step, version.file_version) == (7, "brain.Event:2")
  assert start.step == 7 and start.session_log.status == event_pb2.SessionLog.START
  assert (scalar.step, scalar.summary.value[0].simple_value) == (7, 0.5)
  assert [e.step for e in read_events(first.path)] == [0, 9]
