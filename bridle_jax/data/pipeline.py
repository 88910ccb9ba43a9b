"""The grain input pipeline: records -> decoded, augmented, fixed-size batches.

Per host: shard the source by process index, shuffle by (seed, epoch), repeat, decode
and augment each clip (audio: roll + gain, mixup, pad/crop; images: random resized crop
and flip), skip and count unreadable clips, batch, and run training streams in worker
processes. The iterator's state (`get_state` / `set_state`) goes into checkpoints so a
resumed run continues the same data order. fbank, SpecAugment and normalisation run
later, on the device (`inputs.device_features`).
"""
import dataclasses
import functools
import os
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from bridle_jax.data import audio
from bridle_jax.data import augment
from bridle_jax.data import image
from bridle_jax.data import inputs
from bridle_jax.data import randaugment


@dataclasses.dataclass(frozen=True)
class ClipLoader:
  """Turns a source record into a training example; `rng` drives the augmentations.

  Returns {'waveform' (samples,), 'valid_frames', 'label' (num_classes,), 'skipped',
  'index' (the record's position in the source)} or, for a clip that cannot be decoded,
  {'bad': reason} (logged with its path here, counted and dropped by `SkipBadClips`).
  """
  source: Sequence[dict]  # where mixup partners are drawn from, uniformly
  num_classes: int
  sample_rate: int
  target_length: int
  roll_mag_aug: bool = False
  roll_mag_gain_only: bool = False
  mixup: float = 0.0
  mixup_alpha: float = 10.0
  max_clip_seconds: float = 0.0

  def _decode(self, record: dict, rng: np.random.Generator) -> np.ndarray:
    wave = audio.load_audio(record["audio"] or record["path"], self.sample_rate,
                            name=record["path"], max_seconds=self.max_clip_seconds)
    if self.roll_mag_aug:
      wave = augment.roll_mag(wave, rng, gain_only=self.roll_mag_gain_only)
    return wave

  def _multi_hot(self, labels: np.ndarray) -> np.ndarray:
    target = np.zeros(self.num_classes, np.float32)
    target[labels] = 1.0
    return target

  def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, Any]:
    try:
      wave = self._decode(record, rng)
    except audio.AudioDecodeError as e:
      logging.warning("Skipping unreadable clip: %s", e)
      return {"bad": str(e)}
    label = self._multi_hot(record["labels"])
    if self.mixup > 0 and rng.random() < self.mixup:
      other = self.source[int(rng.integers(len(self.source)))]
      try:
        other_wave = self._decode(other, rng)
      except audio.AudioDecodeError as e:
        logging.warning("Mixup partner unreadable, clip left unmixed: %s", e)
      else:
        lam = augment.sample_mixup_lambda(rng, self.mixup_alpha)
        wave = augment.mix_waveforms(wave, other_wave, lam)
        label = augment.mix_labels(label, self._multi_hot(other["labels"]), lam)
    wave, valid_frames = audio.pad_or_crop(wave, self.target_length, self.sample_rate)
    return {"waveform": wave, "valid_frames": np.int32(valid_frames), "label": label,
            "skipped": np.int32(0), "index": np.int64(record["index"])}


@dataclasses.dataclass(frozen=True)
class ImageLoader:
  """Turns a source record into a training image: {'image' (size, size, 3) uint8, 'label',
  'skipped', 'index'}, or {'bad': reason} for an image that cannot be decoded.

  With `augment` a random resized crop, a random horizontal flip (the reference's
  pretraining transform) and, given a `randaugment` policy, RandAugment (its fine-tuning
  transform); without it the evaluation resize and centre crop.
  """
  num_classes: int
  image_size: int
  augment: bool = True
  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = True
  randaugment: tuple[float, float] | None = None  # (magnitude, std) of the policy
  fill: tuple[int, ...] = (128, 128, 128)  # RandAugment's fill colour (the dataset mean)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict[str, Any]:
    try:
      img = image.load_image(record["audio"] or record["path"], name=record["path"])
    except image.ImageDecodeError as e:
      logging.warning("Skipping unreadable image: %s", e)
      return {"bad": str(e)}
    if self.augment:
      pixels = image.train_crop(img, self.image_size, rng, tuple(self.crop_scale),
                                tuple(self.crop_ratio), self.hflip)
      if self.randaugment:
        pixels = np.asarray(randaugment.rand_augment(Image.fromarray(pixels), rng,
                                                     *self.randaugment, self.fill), np.uint8)
    else:
      pixels = image.eval_crop(img, self.image_size)
    label = np.zeros(self.num_classes, np.float32)
    label[record["labels"]] = 1.0
    return {"image": pixels, "label": label, "skipped": np.int32(0),
            "index": np.int64(record["index"])}


def example_loader(source: Sequence[dict], data_config, *, train: bool,
                   mixup_source: Sequence[dict] | None = None):
  """The loader of `data.modality`, augmenting when `train`."""
  d = data_config
  num_classes = len(source.class_names)
  if inputs.modality(d) == "image":
    return ImageLoader(num_classes=num_classes, image_size=d.image_size, augment=train,
                       crop_scale=tuple(d.crop_scale), crop_ratio=tuple(d.crop_ratio),
                       hflip=d.hflip, fill=randaugment.fill_colour(d.mean),
                       randaugment=(randaugment.parse_policy(d.randaugment)
                                    if d.get("randaugment") else None))
  return ClipLoader(
      source=source if mixup_source is None else mixup_source, num_classes=num_classes,
      sample_rate=d.sample_rate, target_length=d.target_length,
      roll_mag_aug=train and d.roll_mag_aug, roll_mag_gain_only=d.roll_mag_gain_only,
      mixup=d.mixup if train else 0.0, mixup_alpha=d.mixup_alpha,
      max_clip_seconds=d.get("max_clip_seconds", 0.0))


class _SkipBadClipsIterator(grain.DatasetIterator):
  """Drops examples marked bad; the next good example carries how many were dropped.

  Bad clips after the last good one of a finite stream are logged but not counted;
  training streams are infinite, so there every bad clip is counted.
  """

  def __init__(self, parent, max_consecutive: int):
    super().__init__(parent)
    self._max_consecutive = max_consecutive

  def __next__(self):
    skipped = 0
    while True:
      example = next(self._parent)  # StopIteration ends the stream, as it should.
      if "bad" not in example:
        example["skipped"] = np.int32(skipped)
        return example
      skipped += 1
      if skipped >= self._max_consecutive:
        raise ValueError(f"data.manifest: {skipped} clips in a row could not be read (last: "
                         f"{example['bad']}); check the manifest's paths")

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class SkipBadClips(grain.IterDataset):
  """Skips clips that `ClipLoader` could not decode, counting them in 'skipped'.

  `max_consecutive` unreadable clips in a row stop the stream with an error: the
  manifest points at the wrong place, and skipping would otherwise never end.
  """

  def __init__(self, parent, max_consecutive: int):
    super().__init__(parent)
    self._max_consecutive = max_consecutive

  def __iter__(self):
    return _SkipBadClipsIterator(self._parent.__iter__(), self._max_consecutive)


def _with_index(index: int, record: dict, *, num_records: int) -> dict:
  """The record with its position in the source (grain passes indices past the end
  for later epochs)."""
  return {**record, "index": index % num_records}


AUTO_WORKERS_MAX = 16


def host_cores() -> int:
  """CPU cores this process may run on (its affinity mask where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def worker_count(num_workers: int) -> int:
  """`data.num_workers`, with -1 (auto) resolved to one worker per core of this process
  less one for the training loop, at most AUTO_WORKERS_MAX; 0 means in-process."""
  if num_workers >= 0:
    return num_workers
  return min(host_cores() - 1, AUTO_WORKERS_MAX)


# Distance between the data seeds of consecutive hosts; runs derive the seeds of their
# phases from `config.seed` by small offsets, which this keeps apart.
HOST_SEED_STRIDE = 2**20


def host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes (hosts) of this job")
  return global_batch_size // process_count


def build_dataset(source: Sequence[dict], data_config, *, global_batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_epochs: int | None = None, train: bool = True,
                  num_workers: int | None = None,
                  mixup_source: Sequence[dict] | None = None,
                  shuffle: bool = True) -> grain.IterDataset:
  """Returns this host's batched dataset over `source` (infinite unless num_epochs).

  With train=False there is no shuffling, no augmentation, no worker processes and the
  last partial batch is kept, so every clip of this host's shard is seen once per epoch.
  `num_workers` overrides `worker_count(data_config.num_workers)`; mixup partners come
  uniformly from `mixup_source` (default `source`; a weighted sampler passes its clips);
  shuffle=False reads a source whose order is already random (a weighted sampler) in order.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  batch = host_batch_size(global_batch_size, process_count)
  loader = example_loader(source, data_config, train=train, mixup_source=mixup_source)
  ds = grain.MapDataset.source(source).map_with_index(
      functools.partial(_with_index, num_records=len(source)))
  ds = ds[process_index::process_count]
  if len(ds) < batch and train:
    raise ValueError(f"host shard holds {len(ds)} clips, fewer than one batch of {batch}")
  # Each host shuffles its shard and draws its augmentation from a seed of its own: with
  # one seed for all, slot k of every host's batch would hold neighbouring records, rolled,
  # scaled and mixed alike. Host 0 keeps `seed`, so single-host runs are unchanged.
  host_seed = seed + HOST_SEED_STRIDE * process_index
  if train and shuffle:
    ds = ds.shuffle(seed=host_seed)
  ds = ds.repeat(num_epochs).random_map(loader, seed=host_seed)
  if not train:
    workers = 0  # a finite pass runs on threads (below)
  else:
    workers = worker_count(data_config.num_workers) if num_workers is None else num_workers
  # Worker processes queue `prefetch` finished batches each; their threads decode one ahead.
  ahead = 1 if workers else data_config.prefetch
  ds = SkipBadClips(ds.to_iter_dataset(read_options(batch * ahead)),
                    max_consecutive=min(len(source), 1000))
  if not train:
    # A finite pass runs on grain's threads in this process. Worker processes would each
    # batch their own slice and end it with a partial batch; handing them single clips
    # instead was 4.6x slower than threads (1,429 vs 310 clips/s, 1,000 10 s clips).
    return ds.batch(batch, drop_remainder=False)
  ds = ds.batch(batch, drop_remainder=True)
  if not workers:
    return ds
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=data_config.prefetch))


def read_options(clips_ahead: int) -> grain.ReadOptions:
  """grain's decoding threads, reading at most `clips_ahead` clips ahead of the consumer.

  grain's default is 500 clips, whatever the batch: a run of a few steps, or a stream
  dropped at a phase's end or a preemption, decoded up to 500 clips it never used, and
  each worker process held them (320 MB of 10 s clips) on top of its queued batches.
  """
  return grain.ReadOptions(num_threads=min(16, clips_ahead), prefetch_buffer_size=clips_ahead)


class DataStream:
  """This host's infinite training batches, with a position that checkpoints can hold.

  The order of the batches depends on the number of grain workers, so the position
  (`get_state`) records that number next to grain's iterator state, and a stream rebuilt
  from a saved position uses it again: with `data.num_workers=-1` a run resumes on a
  machine with another core count; an explicit count that differs is refused. The
  position also holds `skipped_clips`, the unreadable clips this host's batches skipped
  so far, so the count survives a resume, and the number of clips of the source: a
  position saved over another corpus (a changed data.manifest) is refused, as it would
  resume a different order over different clips, and a phase's step count with it.
  """

  def __init__(self, source: Sequence[dict], data_config, *, global_batch_size: int, seed: int,
               saved: dict | None = None, mixup_source: Sequence[dict] | None = None,
               shuffle: bool = True):
    self.workers = worker_count(data_config.num_workers)
    self.num_clips = len(source)
    if saved is not None and saved.get("num_clips", self.num_clips) != self.num_clips:
      raise ValueError(f"data.manifest: this run's data position was saved over "
                       f"{saved['num_clips']} clips, and the data now has {self.num_clips}; "
                       "resume with the data it started with, or use another --workdir")
    if saved is not None and saved["workers"] != self.workers:
      if data_config.num_workers != -1:
        raise ValueError(f"data.num_workers: this run's data position was saved with "
                         f"{saved['workers']} grain workers and the data order depends on "
                         f"that number; resume with --config.data.num_workers="
                         f"{saved['workers']} (or -1)")
      logging.info("Resuming the data stream with the %d grain workers it was saved with",
                   saved["workers"])
      self.workers = saved["workers"]
    self._iterator = iter(build_dataset(source, data_config, global_batch_size=global_batch_size,
                                        seed=seed, num_workers=self.workers,
                                        mixup_source=mixup_source, shuffle=shuffle))
    self.skipped_clips = 0
    if saved is not None:
      self._iterator.set_state(saved["iterator"])
      self.skipped_clips = saved.get("skipped_clips", 0)  # absent in older checkpoints

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    self.skipped_clips += int(batch["skipped"].sum())
    return batch

  def get_state(self) -> dict:
    return {"workers": self.workers, "iterator": self._iterator.get_state(),
            "skipped_clips": self.skipped_clips, "num_clips": self.num_clips}

  def skipped_clips_of_all_hosts(self) -> int:
    """`skipped_clips` summed over the hosts (each skips its own; every host calls this)."""
    if jax.process_count() == 1:
      return self.skipped_clips
    return int(multihost_utils.process_allgather(np.int64(self.skipped_clips)).sum())


def steps_per_epoch(source: Sequence[dict], global_batch_size: int) -> int:
  """Full global batches in one pass over the source."""
  return len(source) // global_batch_size


def to_device_batch(host_batch: dict, sharding: jax.sharding.Sharding) -> dict:
  """Assembles each host's batch into global arrays sharded along the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)
