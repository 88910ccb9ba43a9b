"""Command-line entry point.

  python -m bridle_jax.main --config=configs/audio.py:demo --workdir=/tmp/bridle --mode=data
  python -m bridle_jax.main --config=configs/audio.py --workdir=DIR \
      --config.data.manifest=train.json --config.data.label_csv=labels.csv --mode=data

`--config.a.b=value` overrides any config field. Modes:
  data   build the input pipeline from the config and report batch shapes, label
         statistics, skipped clips and host throughput (check a manifest with it).
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bridle_jax import config_validation
from bridle_jax.data import demo
from bridle_jax.data import sources

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "data", ["data"], "What to run.")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 20, "Batches read by --mode=data.")

_PATH_FIELDS = ("demo_dir", "manifest", "label_csv")


def prepare(config, workdir: str) -> None:
  """Validates the config, expands its paths and writes the demo corpus if configured."""
  config_validation.validate_config(config)
  for field in _PATH_FIELDS:
    config.data[field] = config_validation.expand_path(config.data[field], workdir)
  if config.data.demo_dir:
    demo.write_demo_corpus(config.data.demo_dir, seed=config.seed)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/audio.py:demo")
  workdir = _WORKDIR.value
  if not workdir:
    raise app.UsageError("--workdir is required")
  try:
    os.makedirs(workdir, exist_ok=True)
    prepare(config, workdir)
    if _MODE.value == "data":
      from bridle_jax.data import report  # pylint: disable=g-import-not-at-top
      result = report.run_data_report(config, _DATA_BATCHES.value)
      print(json.dumps(result, indent=1, default=str))
  except (config_validation.ConfigError, sources.DataError, OSError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
