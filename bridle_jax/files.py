"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_output(path: str, *, durable: bool = False):
  """A binary file to write `path` through: a temp file in the same directory that
  replaces `path` when the block ends, or is removed if it raises.

  durable=True also fsyncs the file and its directory, so the write survives a crash
  of the machine, not only of the process.
  """
  directory = os.path.dirname(path) or "."
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      if durable:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise
  if durable:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def write_atomic(path: str, data: bytes, *, durable: bool = False) -> None:
  """Writes `data` to `path` through `atomic_output`."""
  with atomic_output(path, durable=durable) as f:
    f.write(data)
