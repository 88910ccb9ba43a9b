"""bfloat16 against float32: loss curves of the same run, and agreement of tokenizer codes.

  python -m bridle_jax.precision_check --config=configs/audio.py:demo --workdir=/tmp/precision

Trains every phase of `config.rounds` three times: in float32, in bfloat16 (same seed, data
order and initialisation; the quantizer is float32 in both), and in float32 with the next
seed, which measures how far two equally valid float32 runs end apart. The float32 runs
compute as the reference does (the config's speed settings reset to
`workdir.SPEED_DEFAULTS`, e.g. exact GELU); the bfloat16 run keeps the config's. Per phase
it compares the mean losses over the last quarter of the steps: bfloat16 is within noise
when its gap to float32 is no larger than the other seed's gap plus twice the standard
error of the float32 tail mean. Then, on one batch and the float32 run's final parameters,
it computes in float32 and in bfloat16 the tokenizer's codes (the fraction of patches
given the same code, per codebook) and the gradients of the encoder and tokenizer phase
losses (the bfloat16 gradient's distance from the float32 one, relative to its norm): the
rounding error of a single step, which the loss curves show only blurred by the
run-to-run spread of training.
"""
import copy
import functools
import json
import os
import sys

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from bridle_jax import driver
from bridle_jax import prepare
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import inputs
from bridle_jax.data import pipeline
from bridle_jax.data import sources
from bridle_jax.train import state as state_lib
from bridle_jax.train import steps

# Run name -> (model.dtype, seed offset).
RUNS = {"float32": ("float32", 0), "bfloat16": ("bfloat16", 0),
        "float32_next_seed": ("float32", 1)}


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/audio.py:demo.")
  flags.DEFINE_string("workdir", None, "Empty directory for the three runs.")
  flags.DEFINE_integer("code_batch", 64, "Clips for the code and gradient agreement.")


def train_runs(config, workdir: str) -> dict:
  """{run name: {phase id: float32 array of per-step losses}} of the RUNS, all fresh."""
  for name in RUNS:
    if os.path.exists(os.path.join(workdir, name, workdir_lib.CONFIG_FILE)):
      raise ValueError(f"{os.path.join(workdir, name)} already holds a run; use an empty "
                       "--workdir")
  curves = {}
  for name, (dtype, seed_offset) in RUNS.items():
    run_config = copy.deepcopy(config)
    run_config.model.dtype = dtype
    if dtype == "float32":  # the reference's computation, e.g. exact GELU
      run_config.update_from_flattened_dict(workdir_lib.SPEED_DEFAULTS)
    run_config.seed += seed_offset
    trainer = driver.Trainer(run_config, os.path.join(workdir, name))
    trainer.run()
    curves[name] = {phase: np.array([loss for _, loss in history], np.float32)
                    for phase, history in trainer.loss_histories.items()}
  return curves


def compare_curves(reference: np.ndarray, bf16: np.ndarray, next_seed: np.ndarray) -> dict:
  """bf16's last-quarter mean loss against float32's, and the gap a new seed makes."""
  tail = max(len(reference) // 4, 2)
  means = [float(np.mean(curve[-tail:])) for curve in (reference, bf16, next_seed)]
  gap, seed_gap = means[1] - means[0], means[2] - means[0]
  standard_error = float(np.std(reference[-tail:]) / np.sqrt(tail))
  return {"float32_tail_mean": means[0], "bfloat16_tail_mean": means[1],
          "float32_next_seed_tail_mean": means[2], "gap": gap, "seed_gap": seed_gap,
          "float32_tail_standard_error": standard_error,
          "within_noise": abs(gap) <= abs(seed_gap) + 2 * standard_error}


def _final_state_and_batch(config, workdir: str, num_clips: int):
  """(float32 models, bfloat16 models, the float32 run's final state, one batch's features)."""
  _, models, pretrained = workdir_lib.load_pretrained(os.path.join(workdir, "float32"))
  source = sources.open_source(config.data)
  batch = next(iter(pipeline.build_dataset(
      source, config.data, global_batch_size=min(num_clips, len(source)), seed=config.seed,
      process_index=0, process_count=1, num_epochs=1, train=False)))
  x = models.features({k: batch[k] for k in inputs.batch_keys(config.data)}, None)
  return models, state_lib.build_models(bf16_config(config)), pretrained, x


def bf16_config(config):
  """The checked config in bfloat16, its speed settings kept (`load_pretrained` resets
  those of the float32 side, e.g. `model.residual_stream_dtype`)."""
  low_config = copy.deepcopy(config)
  low_config.model.dtype = "bfloat16"
  return low_config


def code_agreement(models, low_models, pretrained, x) -> list[float]:
  """Per codebook, the fraction of patches whose code is the same in float32 and bfloat16."""
  codes = [np.asarray(jax.jit(functools.partial(steps.tokenizer_codes, m, cold_start=False))(
      pretrained["params"], pretrained["codebooks"], x)[0]) for m in (models, low_models)]
  spec = models.quantizer
  same = (codes[0] == codes[1]).reshape(-1, spec.num_codebooks, spec.soft_code)
  return same.mean(axis=(0, 2)).tolist()


def _squared_norm(leaves) -> float:
  return sum(float(np.sum(np.square(np.float64(g)))) for g in leaves)


def gradient_error(models, low_models, pretrained, x) -> dict:
  """Per phase loss, |g_bf16 - g_f32| / |g_f32| over all parameters (same batch and mask)."""
  losses = {"encoder": functools.partial(steps.encoder_phase_loss, cold_start=False),
            "tokenizer": steps.tokenizer_phase_loss}
  errors = {}
  for phase, loss_fn in losses.items():
    grads = [jax.tree.leaves(jax.jit(jax.grad(
        lambda p, m=m: loss_fn(m, p, pretrained["codebooks"], x, jax.random.key(0))[0]))(
            pretrained["params"])) for m in (models, low_models)]
    difference = _squared_norm([g32 - g16 for g32, g16 in zip(*grads)])
    errors[phase] = float(np.sqrt(difference / _squared_norm(grads[0])))
  return errors


def run(config, workdir: str, code_batch: int) -> dict:
  prepare.prepare(config, workdir)
  curves = train_runs(config, workdir)
  phases = {phase: compare_curves(*(curves[name][phase] for name in RUNS))
            for phase in curves["float32"]}
  final = _final_state_and_batch(config, workdir, code_batch)
  return {"phases": phases, "code_agreement": code_agreement(*final),
          "gradient_error": gradient_error(*final)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  try:
    report = run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.code_batch)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
