"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
import os
import tempfile


def write_atomic(path: str, data: bytes, *, durable: bool = False) -> None:
  """Writes `data` to `path` through a temp file in the same directory and os.replace.

  durable=True also fsyncs the file and its directory, so the write survives a crash
  of the machine, not only of the process.
  """
  directory = os.path.dirname(path) or "."
  fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
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
