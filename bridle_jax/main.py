"""Command-line entry point.

  python -m bridle_jax.main --config=configs/audio.py:demo --workdir=/tmp/bridle
  python -m bridle_jax.main --config=configs/audio.py --workdir=DIR \
      --config.data.manifest=train.json --config.data.label_csv=labels.csv

`--config.a.b=value` overrides any config field. Modes (--mode, default `config.mode`):
  train  run (or resume) every phase of `config.rounds`; checkpoints, TensorBoard
         events, plots and summary.json go to the workdir.
  data   build the input pipeline from the config and report batch shapes, label
         statistics, skipped clips and host throughput (check a manifest with it).
  finetune, probe
         fine-tune or linear-probe a pretrained encoder (configs/finetune_audio.py).
"""
import json
import logging as std_logging
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bridle_jax import distributed
from bridle_jax import files
from bridle_jax import prepare
from bridle_jax.train import preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", None, ["train", "data", "finetune", "probe"],
                          "What to run (default: config.mode).")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 20, "Batches read by --mode=data.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join a multi-process job (TPU pod slice, multi-node GPU) first; "
    "TPU, SLURM and Open MPI jobs need no other flag.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (with --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps orbax's per-save INFO chatter out of the training log (warnings still pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _parse_flags(argv):
  """absl flag parsing whose errors (bad override, unknown field, bad file) are one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except (AttributeError, KeyError) as e:  # an override names a field the config lacks
    name = str(e).strip("\"'")
    culprit = [a for a in argv if a.startswith("--config.") and f".{name}=" in a + "="]
    _fail(f"unknown config field {name!r}" + (f" in {culprit[0]}" if culprit else ""))
  except (OSError, ValueError, SyntaxError) as e:
    _fail(f"cannot load the config: {e}")


def _fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def _check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
    files.write_atomic(probe, b"")
    os.remove(probe)
  except OSError as e:
    raise OSError(f"workdir {workdir} is not writable: {e.strerror or e}") from e


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
  if _DISTRIBUTED.value:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    _check_writable(workdir)
    prepare.prepare(config, workdir)
    mode = _MODE.value or config.get("mode", "train")
    # Each mode imports what it runs: a bad flag or config fails in a second or two.
    if mode == "data":
      from bridle_jax.data import report  # pylint: disable=g-import-not-at-top
      result = report.run_data_report(config, _DATA_BATCHES.value)
    elif mode in ("finetune", "probe"):
      from bridle_jax.evaluate import finetune  # pylint: disable=g-import-not-at-top
      result = finetune.run(config, workdir, mode)
    else:
      from bridle_jax import driver  # pylint: disable=g-import-not-at-top
      result = driver.train(config, workdir)
    print(json.dumps(result, indent=1, default=str))
  except preemption.Preempted as e:
    logging.warning("%s", e)
    _fail(str(e), code=143)
  except (ValueError, OSError) as e:  # ConfigError and DataError are ValueErrors
    logging.error("%s", e)
    _fail(str(e))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags)
