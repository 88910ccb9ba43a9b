"""Reads TensorBoard event files back with tensorboardX's protos and checksum."""
import struct

from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c


def read_events(path) -> list:
  """The `Event` protos of one file, checking both CRCs of every record."""
  with open(path, "rb") as f:
    data = f.read()
  records, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
    record = data[offset + 12:offset + 12 + length]
    assert struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] == (
        masked_crc32c(record))
    records.append(event_pb2.Event.FromString(record))
    offset += 16 + length
  return records
