"""What every command does with a config first: check it, expand its paths, write demo data."""
from bridle_jax import config_validation
from bridle_jax.data import demo

PATH_FIELDS = ("demo_dir", "manifest", "label_csv")


def prepare(config, workdir: str) -> None:
  """Validates the config, expands its data paths and writes the demo corpus if configured."""
  config_validation.validate_config(config)
  for field in PATH_FIELDS:
    config.data[field] = config_validation.expand_path(config.data[field], workdir)
  if config.data.demo_dir:
    demo.write_demo_corpus(config.data.demo_dir, seed=config.seed)
