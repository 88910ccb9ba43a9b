"""`--mode=data`: builds the pipeline from a config and reports what it delivers.

Users run it to check a manifest before a long job: label statistics, batch shapes
on the device mesh, statistics of the model's input (normalised fbank or pixels),
skipped (unreadable) clips and the host's throughput in clips per second.
"""
import time

import jax
import numpy as np
from absl import logging

from bridle_jax.data import inputs
from bridle_jax.data import pipeline
from bridle_jax.data import sources
from bridle_jax.train import sharding as train_sharding


def run_data_report(config, num_batches: int) -> dict:
  """Reads `num_batches` global batches and returns (and logs) the report."""
  data = config.data
  source = sources.open_source(data)
  stats = sources.label_statistics(source)
  field = ("finetune" if config.get("finetune") is not None
           else f"{config.rounds[0]}_phase") + ".batch_size"
  batch_size = config[field.split(".")[0]].batch_size
  mesh = train_sharding.make_mesh(config.mesh)  # the job's mesh: a bad one fails here
  train_sharding.check_batch_divides(field, batch_size, mesh)
  sharding = train_sharding.batch_sharding(mesh)
  ds = pipeline.build_dataset(source, data, global_batch_size=batch_size, seed=config.seed)
  keys = inputs.batch_keys(data)
  front_end = inputs.device_features(data)
  features_fn = jax.jit(lambda batch: front_end(batch, None))  # no SpecAugment: the raw input

  iterator = iter(ds)
  first = next(iterator)  # Worker start-up and compilation stay out of the timing.
  features = features_fn(pipeline.to_device_batch({k: first[k] for k in keys}, sharding))
  skipped = int(first["skipped"].sum())
  label_sum = first["label"].sum(0)
  start = time.perf_counter()
  clips = 0
  for _ in range(num_batches - 1):
    batch = next(iterator)
    features = features_fn(pipeline.to_device_batch({k: batch[k] for k in keys}, sharding))
    skipped += int(batch["skipped"].sum())
    label_sum += batch["label"].sum(0)
    clips += len(batch["label"])
  jax.block_until_ready(features)
  elapsed = time.perf_counter() - start
  report = {
      "clips": stats["num_clips"],
      "classes": stats["num_classes"],
      "unlabelled_clips": stats["num_unlabelled"],
      "max_labels_per_clip": stats["max_labels_per_clip"],
      "min_clips_per_class": int(np.min(stats["clips_per_class"])),
      "max_clips_per_class": int(np.max(stats["clips_per_class"])),
      "steps_per_epoch": pipeline.steps_per_epoch(source, batch_size),
      f"{keys[0]}_batch": tuple(first[keys[0]].shape),
      "label_batch": tuple(first["label"].shape),
      "feature_batch": tuple(features.shape),
      "feature_mean": float(features.mean()),
      "feature_std": float(features.std()),
      "batch_sharding": str(sharding.spec),
      "devices": len(jax.devices()),
      "mesh": dict(mesh.shape),
      "batches_read": num_batches,
      "classes_seen": int((label_sum > 0).sum()),
      "skipped_clips": skipped,
      "clips_per_second": clips / elapsed if clips else float("nan"),
  }
  for key, value in report.items():
    logging.info("data report: %-20s %s", key, value)
  return report
