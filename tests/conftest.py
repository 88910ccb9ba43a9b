"""Test setup: eight emulated CPU devices so sharded code paths run on any machine, and
quick CPU compilation."""
import os
import tempfile

import cpu_env

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI tests start many processes that compile the same programs: share compilations,
# the small ones too (they cost a CLI run about 3 s of its 30).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "bridle_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_env.xla_flags(8)).strip()

from absl import flags  # pylint: disable=g-import-not-at-top

# grain worker processes read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()

# The modules that take longest (seconds of test time on 2 cores with an empty compilation
# cache, 2026-11-27), longest first: the two workers take whole modules in collection order
# (pytest.ini), so the short ones come last and both workers finish at about the same time.
_LONGEST_MODULES = (
    "test_training.py",          # 261
    "test_hardening.py",         # 187
    "test_attention.py",         # 161
    "test_benchmark.py",         # 117
    "test_multiprocess.py",      # 95
    "test_precision_check.py",   # 88
    "test_finetune.py",          # 87
    "test_image.py",             # 80 (2026-11-28)
    "test_driver_codebooks.py",  # 68
    "test_aot.py",               # 64
    "test_convert.py",           # 55
    "test_embeddings.py",        # 55
    "test_vit.py",               # 37
    "test_device_memory.py",     # 34
    "test_decoder.py",           # 30
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _LONGEST_MODULES.index(name) if name in _LONGEST_MODULES else len(_LONGEST_MODULES)
  items.sort(key=rank)  # stable: the other modules and every module's tests keep their order
