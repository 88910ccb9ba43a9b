"""Test setup: eight emulated CPU devices so sharded code paths run on any machine."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

from absl import flags  # pylint: disable=g-import-not-at-top

# grain worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
