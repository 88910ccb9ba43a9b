"""What every command does with a config first: check it, expand its paths, write demo data,
turn on the compilation cache."""
import os

import jax
from jax.experimental import multihost_utils

from bridle_jax import compile_cache
from bridle_jax import config_validation
from bridle_jax.data import demo
from bridle_jax.data import demo_images
from bridle_jax.data import inputs

PATH_FIELDS = ("demo_dir", "manifest", "label_csv")


def prepare(config, workdir: str) -> None:
  """Validates the config, expands its data paths, makes `init_from` absolute (it is saved
  with the run, which may resume from another directory), writes the demo corpus if
  configured and, given a workdir, caches compiled programs in `compile_cache_dir` (see
  `compile_cache`)."""
  config_validation.validate_config(config)
  for field in PATH_FIELDS:
    config.data[field] = config_validation.expand_path(config.data[field], workdir)
  if config.get("init_from"):
    config.init_from = os.path.abspath(
        config_validation.expand_path(config.init_from, workdir))
  if workdir and "compile_cache_dir" in config:
    config.compile_cache_dir = config_validation.expand_path(config.compile_cache_dir, workdir)
    compile_cache.enable(config.compile_cache_dir)
  if config.data.demo_dir:
    if jax.process_index() == 0:
      if inputs.modality(config.data) == "image":
        demo_images.write_demo_images(config.data.demo_dir, seed=config.seed)
      else:
        demo.write_demo_corpus(config.data.demo_dir, seed=config.seed)
    if jax.process_count() > 1:  # the others read it once process 0 has written it
      multihost_utils.sync_global_devices("demo corpus written")
