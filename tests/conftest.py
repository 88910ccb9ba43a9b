"""Test setup: eight emulated CPU devices so sharded code paths run on any machine, and
quick CPU compilation."""
import os
import tempfile

import cpu_env

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI tests start many processes that compile the same programs: share compilations.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "bridle_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_env.xla_flags(8)).strip()

from absl import flags  # pylint: disable=g-import-not-at-top

# grain worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
