"""The demo's verdict: does pretraining beat a random encoder of the same architecture?

Both encoders (the last finished phase of the workdir, and a fresh initialisation) embed the
demo corpus's train.json and eval.json (next to `config.data.manifest`); a fast probe
(`fast_probe`, logistic regression on mean-pooled embeddings) is fitted on train and scored
on eval. Codebook usage is that of the last phase's codebooks on the eval clips, through the
tokenizer that phase used (the cold-start projection when no tokenizer has been trained).
Everything runs on the first local device (single host, as the demo).
"""
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from bridle_jax import workdir as workdir_lib
from bridle_jax.data import inputs
from bridle_jax.data import sources
from bridle_jax.evaluate import embeddings
from bridle_jax.evaluate import fast_probe
from bridle_jax.train import monitor
from bridle_jax.train import steps

TOKENIZER_KINDS = ("tokenizer", "joint")


def _demo_sources(config) -> dict:
  """The train.json and eval.json sources beside `config.data.manifest`."""
  corpus_dir = os.path.dirname(os.path.abspath(config.data.manifest))
  result = {}
  for split in ("train", "eval"):
    data = ml_collections.ConfigDict({"format": "json", "label_csv": config.data.label_csv,
                                      "manifest": os.path.join(corpus_dir, f"{split}.json"),
                                      "modality": inputs.modality(config.data)})
    result[split] = sources.open_source(data)
  return result


def _uses_cold_start(workdir: str, pretrain_config) -> bool:
  """True when no tokenizer was trained up to the last finished phase (here or in init_from)."""
  phase_ids = (workdir_lib.init_from_phases(workdir, pretrain_config)
               + workdir_lib.finished_phases(workdir))
  return not any(phase_id.split("_", 1)[1] in TOKENIZER_KINDS for phase_id in phase_ids)


def codebook_usage(pretrain_config, models, tree: dict, source, cold_start: bool) -> dict:
  """Fraction of codes used and perplexity per codebook over every patch of `source`'s clips."""
  data = pretrain_config.data
  spec = models.quantizer

  @jax.jit
  def codes_of(params, codebooks, batch):
    x = models.features(batch, None)
    return steps.tokenizer_codes(models, params, codebooks, x, cold_start=cold_start)[0]

  counts = np.zeros((spec.num_codebooks, spec.codebook_size), np.int64)
  batches = embeddings.clip_batches(source, data, embeddings.DEFAULT_BATCH_SIZE)
  for indices, batch, failed in batches:
    codes = np.asarray(codes_of(tree["params"], tree["codebooks"], batch))
    per_stage = codes[~np.isin(indices, failed)].reshape(-1, spec.num_codebooks, spec.soft_code)
    for stage in range(spec.num_codebooks):
      counts[stage] += np.bincount(per_stage[:, stage].ravel(), minlength=spec.codebook_size)
  used, perplexity = monitor.codebook_usage_stats(counts)
  return {"fraction_used": used.tolist(), "perplexity": perplexity.tolist(),
          "codebook_size": spec.codebook_size, "cold_start_tokenizer": cold_start}


def run_verdict(config, workdir: str, *, probe_steps: int = fast_probe.DEFAULT_STEPS,
                l2: float = fast_probe.DEFAULT_L2) -> dict:
  """{'verdict': {pretrained_accuracy, random_init_accuracy, codebook_usage, ...}}."""
  pretrain_config, models, tree = workdir_lib.load_pretrained(workdir)
  phase_id = workdir_lib.finished_phases(workdir)[-1]
  demo = _demo_sources(config)
  labels = {split: embeddings.multi_hot_labels(source) for split, source in demo.items()}
  random_params = embeddings.random_encoder_params(
      pretrain_config.model, pretrain_config.data, jax.random.PRNGKey(pretrain_config.seed + 1))
  accuracy = {}
  for name, params in (("pretrained", tree["params"]["encoder"]), ("random_init", random_params)):
    embedder = embeddings.Embedder(pretrain_config.model, pretrain_config.data, params)
    pooled = {split: embedder.embed_source(source)["pooled"] for split, source in demo.items()}
    result = fast_probe.fit_and_evaluate(
        pooled["train"], labels["train"], pooled["eval"], labels["eval"],
        multi_label=bool(pretrain_config.data.multi_label), l2=l2, steps=probe_steps)
    accuracy[name] = result["accuracy"]
  usage = codebook_usage(pretrain_config, models, tree, demo["eval"],
                         _uses_cold_start(workdir, pretrain_config))
  gain = 100 * (accuracy["pretrained"] - accuracy["random_init"])
  message = (f"fast-probe accuracy on eval.json: pretrained {accuracy['pretrained']:.3f} vs "
             f"random init {accuracy['random_init']:.3f} ({gain:+.1f} points); codes used per "
             f"codebook {', '.join(f'{u:.0%}' for u in usage['fraction_used'])} of "
             f"{usage['codebook_size']}")
  logging.info("verdict (%s): %s", phase_id, message)
  return {"verdict": {
      "phase": phase_id, "pretrained_accuracy": accuracy["pretrained"],
      "random_init_accuracy": accuracy["random_init"],
      "train_clips": len(demo["train"]), "eval_clips": len(demo["eval"]),
      "probe": f"logistic regression, {probe_steps} L-BFGS steps, l2 {l2}, on mean-pooled "
               "embeddings",
      "codebook_usage": usage, "message": message}}
