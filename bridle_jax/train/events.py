"""TensorBoard event files of scalar summaries, written with the standard library alone.

A file is a sequence of TFRecords (little-endian uint64 length, masked CRC-32C of the
length, the serialized `Event` proto, masked CRC-32C of it). The protos written here are
`Event{wall_time, step, file_version | summary | session_log}` with
`Summary{value{tag, simple_value}}`, encoded by hand: that needs neither TensorFlow nor
tensorboardX (which imports torch when it is installed, seconds at every start).
"""
import itertools
import os
import socket
import struct
import time

_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reversed.


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (_CRC32C_POLY if crc & 1 else 0)
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()
_writer_ids = itertools.count()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC-32C rotated right by 15 bits plus a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, wall_time: float, body: bytes) -> bytes:
  """Event: wall_time (1, double), step (2, int64), then one of its payload fields."""
  return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


def _scalar_body(tag: str, value: float) -> bytes:
  """Event.summary (5) holding Summary.value (1) = Value{tag (1), simple_value (2, float)}."""
  summary_value = _length_delimited(1, tag.encode("utf-8")) + b"\x15" + struct.pack("<f", value)
  return _length_delimited(5, _length_delimited(1, summary_value))


def _record(event: bytes) -> bytes:
  length = struct.pack("<Q", len(event))
  return (length + struct.pack("<I", masked_crc32c(length)) + event
          + struct.pack("<I", masked_crc32c(event)))


class ScalarWriter:
  """Appends scalar events to a new `events.out.tfevents.*` file in `logdir`.

  purge_step: the first step this run writes (a resumed run's, or 1); TensorBoard then
  hides the events that earlier files hold at or after it (a SessionLog START at that
  step).
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    # Unique per writer, so two writers never share a file (TensorBoard reads them all).
    name = (f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
            f".{next(_writer_ids)}")
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "xb")
    step = purge_step or 0
    self._file.write(_record(_event(step, now, _length_delimited(3, b"brain.Event:2"))))
    if purge_step is not None:
      # Event.session_log (7) = SessionLog{status (1) = START (1)}.
      self._file.write(_record(_event(step, now, _length_delimited(7, b"\x08\x01"))))
    self._file.flush()

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    self._file.write(_record(_event(step, time.time(), _scalar_body(tag, value))))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
