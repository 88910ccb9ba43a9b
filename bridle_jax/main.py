"""Command-line entry point.

  python -m bridle_jax.main --config=configs/audio.py:demo --workdir=/tmp/bridle
  python -m bridle_jax.main --config=configs/audio.py --workdir=DIR \
      --config.data.manifest=train.json --config.data.label_csv=labels.csv

`--config.a.b=value` overrides any config field. Modes:
  train  run (or resume) every phase of `config.rounds`; checkpoints, TensorBoard
         events, plots and summary.json go to the workdir.
  data   build the input pipeline from the config and report batch shapes, label
         statistics, skipped clips and host throughput (check a manifest with it).
"""
import json
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bridle_jax import config_validation
from bridle_jax import driver
from bridle_jax.data import report
from bridle_jax.data import demo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "data"], "What to run.")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 20, "Batches read by --mode=data.")

_PATH_FIELDS = ("demo_dir", "manifest", "label_csv")


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the training log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


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
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  try:
    os.makedirs(workdir, exist_ok=True)
    prepare(config, workdir)
    if _MODE.value == "data":
      result = report.run_data_report(config, _DATA_BATCHES.value)
    else:
      result = driver.train(config, workdir)
    print(json.dumps(result, indent=1, default=str))
  except (ValueError, OSError) as e:  # ConfigError and DataError are ValueErrors
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
