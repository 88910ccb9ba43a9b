"""Builds a JSON manifest or a class folder into TFDS ArrayRecord shards, and reads them
back, without TensorFlow.

  python -m bridle_jax.data.tfds_builder --manifest M --label_csv L --data_dir D \
      [--modality=image]

writes D/audio_manifest/<name>/1.0.0/ (images: D/image_manifest/...; name: the manifest's
file stem or the folder's name by default); train on it with data.format=tfds and
data.manifest set to that directory. Each example holds the encoded file bytes (feature
"audio" or "image"), so a run reads a few large shards instead of millions of files. A
class folder (`--manifest` a directory, root/<class>/<file>) needs no label csv.

The builder is a `tfds.core.ShardBasedBuilder`: shards are written one after another in
manifest order. (`GeneratorBasedBuilder` spills its shuffle buffer through tf.io.gfile
once a split passes 1 GiB, which needs TensorFlow; grain shuffles at read time anyway.)
tfds holds one shard's examples in memory while writing it, so `clips_per_shard` bounds
the build's memory. Files that cannot be read, or whose header soundfile (audio) or Pillow
(images) cannot parse, are skipped, logged and listed in the dataset's metadata.json.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import glob
import io
import os
import shutil
import tempfile

import numpy as np
import soundfile as sf
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from bridle_jax.data import inputs
from bridle_jax.data import sources

VERSION = "1.0.0"
FILE_FORMAT = "array_record"
LABEL_TABLE_SUFFIX = ".label_table.npz"  # "<split>.label_table.npz" next to the shards
FEATURE_NAMES = ("path", "labels", "fold")  # and the file bytes, named by the modality


@dataclasses.dataclass
class AudioManifestConfig(tfds.core.BuilderConfig):
  """The manifest (or class folder) to build into split `split`; `name` names the built
  dataset."""
  manifest: str = ""
  label_csv: str = ""  # "" for a class folder
  split: str = "train"
  clips_per_shard: int = 1024
  read_threads: int = 8


class AudioManifest(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Encoded audio files with their path, class indices and fold, from a JSON manifest or
  a class folder.

  The class ids (mids) are the names of the `labels` ClassLabel; display names, the
  modality, the source files and the skipped clips are in the metadata. Per-clip labels
  are also saved as a label table so statistics need no pass over the files.
  """
  VERSION = tfds.core.Version(VERSION)
  MODALITY = "audio"
  # Nothing is downloaded. Declaring it also skips tfds' checksum-file lookup, which for
  # a builder defined in a package needs `importlib_resources`, undeclared by tfds 4.9.
  url_infos = None

  @functools.cached_property
  def _manifest(self) -> sources.PackedSource:
    config = self.builder_config
    if os.path.isdir(config.manifest):
      return sources.FolderSource(config.manifest, inputs.EXTENSIONS[self.MODALITY])
    return sources.JsonManifestSource(config.manifest, sources.load_label_map(config.label_csv),
                                      file_key=inputs.MANIFEST_FILE_KEY[self.MODALITY])

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.MODALITY.capitalize()} files of {config.manifest}",
        features=tfds.features.FeaturesDict({
            self.MODALITY: tfds.features.Tensor(shape=(), dtype=np.object_),
            "path": tfds.features.Text(),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(
                names=self._manifest.label_ids)),
            "fold": tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(
            display_names=self._manifest.class_names, modality=self.MODALITY,
            manifest=config.manifest, label_csv=config.label_csv))

  def _shard_iterators_per_split(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    self._written = np.ones(len(self._manifest), bool)
    self._skipped = []
    shard_starts = range(0, len(self._manifest), config.clips_per_shard)
    return {config.split: [
        functools.partial(self._generate_examples, start,
                          min(start + config.clips_per_shard, len(self._manifest)))
        for start in shard_starts]}

  def _generate_examples(self, start: int, stop: int):
    """Yields (manifest index, example) for the readable clips of entries [start, stop)."""
    records = [self._manifest[i] for i in range(start, stop)]
    file_contents = _read_files([record["path"] for record in records], self.MODALITY,
                                self.builder_config.read_threads)
    for index, record, (encoded, problem) in zip(range(start, stop), records, file_contents):
      if problem:
        logging.warning("Skipping %s: %s", record["path"], problem)
        self._skipped.append({"path": record["path"], "reason": problem})
        self._written[index] = False
        continue
      yield index, {self.MODALITY: encoded, "path": record["path"],
                    "labels": record["labels"], "fold": record["fold"]}

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    config = self.builder_config
    if not self._written.any():
      raise sources.DataError(f"{config.manifest}: none of the {len(self._written)} "
                              f"{self.MODALITY} files could be read")
    values, offsets = self._manifest.label_table()
    labels_per_clip = np.diff(offsets)
    kept_values = values[np.repeat(self._written, labels_per_clip)]
    kept_offsets = np.concatenate([[0], np.cumsum(labels_per_clip[self._written])])
    with open(os.path.join(self.data_dir, config.split + LABEL_TABLE_SUFFIX), "wb") as f:
      np.savez(f, values=kept_values, offsets=kept_offsets)
    self.info.metadata.update(num_skipped=len(self._skipped), skipped=self._skipped)
    logging.info("Wrote %d files of %s, skipped %d unreadable", self._written.sum(),
                 config.manifest, len(self._skipped))


class ImageManifest(AudioManifest, skip_registration=True):
  """Encoded image files (feature "image"), otherwise as `AudioManifest`."""
  MODALITY = "image"


BUILDERS = {"audio": AudioManifest, "image": ImageManifest}


def build_array_record(manifest: str, label_csv: str, data_dir: str, split: str = "train",
                       *, name: str = "", modality: str = "audio", clips_per_shard: int = 1024,
                       read_threads: int = 8, overwrite: bool = False) -> str:
  """Builds `manifest` (a JSON manifest with `label_csv`, or a class folder with
  label_csv "") as split `split`; returns the built dataset directory.

  `name` (default: the manifest's file stem or the folder's name) is the dataset's
  directory under data_dir/audio_manifest/ (images: image_manifest/). An existing build is
  only replaced with `overwrite`.
  """
  if clips_per_shard < 1 or read_threads < 1:
    raise ValueError(f"clips_per_shard ({clips_per_shard}) and read_threads ({read_threads}) "
                     "must be positive")
  if modality not in BUILDERS:
    raise ValueError(f"modality {modality!r} is not one of {', '.join(BUILDERS)}")
  manifest = os.path.abspath(manifest)
  if not os.path.exists(manifest):
    raise sources.DataError(f"{manifest}: not found (a JSON manifest or a class folder)")
  if os.path.isdir(manifest) and label_csv:
    raise sources.DataError(f"{manifest}: a class folder's classes are its folder names; "
                            "leave out the label csv (--label_csv)")
  if not os.path.isdir(manifest) and not label_csv:
    raise sources.DataError(f"{manifest}: a JSON manifest needs a label csv (--label_csv)")
  config = AudioManifestConfig(
      name=name or os.path.splitext(os.path.basename(manifest))[0], manifest=manifest,
      label_csv=os.path.abspath(label_csv) if label_csv else "", split=split,
      clips_per_shard=clips_per_shard, read_threads=read_threads)
  builder_class = BUILDERS[modality]
  dataset_dir = os.path.join(os.path.abspath(data_dir), builder_class.name, config.name, VERSION)
  with _build_lock(dataset_dir):
    if os.path.exists(dataset_dir) and not overwrite:
      raise sources.DataError(f"{dataset_dir}: already built (rebuild with overwrite=True, "
                              "--overwrite on the command line)")
    # tfds writes into incomplete.<random>_<version> and renames it when done: one left
    # beside the dataset is the partial output of a build that was killed.
    for leftover in glob.glob(os.path.join(os.path.dirname(dataset_dir),
                                           f"incomplete.*_{VERSION}")):
      logging.warning("Removing %s, the partial output of an interrupted build", leftover)
      shutil.rmtree(leftover)
    # Constructing the builder reads the whole manifest or folder (its classes).
    builder = builder_class(config=config, data_dir=os.path.abspath(data_dir),
                            file_format=FILE_FORMAT)
    with tempfile.TemporaryDirectory() as unused_download_dir:  # tfds creates one
      builder.download_and_prepare(
          download_dir=unused_download_dir,
          download_config=tfds.download.DownloadConfig(
              download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
  return dataset_dir


@contextlib.contextmanager
def _build_lock(dataset_dir: str):
  """Holds `.<version>.build.lock` beside the dataset for a build. A second build of the
  same dataset (on this machine, or on another that mounts the directory with file
  locking) fails at once instead of deleting the first one's output as a leftover; the
  operating system releases the lock of a build that is killed."""
  path = os.path.join(os.path.dirname(dataset_dir), f".{os.path.basename(dataset_dir)}.build.lock")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise sources.DataError(f"{dataset_dir}: another build of this dataset is running "
                              f"(it holds {path}); wait for it to finish") from None
    yield
  finally:
    os.close(fd)


class TfdsSource:
  """A dataset built by `build_array_record`; records carry the file bytes as "audio"
  (whatever the `modality`, as other sources do).

  Pickles without its open readers (grain worker processes reopen them on first use).
  """

  def __init__(self, dataset_dir: str, split: str | None = None):
    """split: default the dataset's only split (a build writes one), else "train"."""
    self.dataset_dir = os.path.abspath(dataset_dir)
    info = self._open_builder().info
    if split is None:
      split = next(iter(info.splits)) if len(info.splits) == 1 else "train"
    self.split = split
    if split not in info.splits:
      raise sources.DataError(f"{self.dataset_dir}: no split {split!r} "
                              f"(splits: {', '.join(info.splits)})")
    self.modality = _modality(info)
    self.label_ids = list(info.features["labels"].feature.names)
    self.class_names = list(info.metadata["display_names"])
    self._num_records = info.splits[split].num_examples
    self._records = None

  def _open_builder(self):
    try:
      builder = tfds.builder_from_directory(self.dataset_dir)
    except (OSError, ValueError) as e:
      raise sources.DataError(f"{self.dataset_dir}: not a built TFDS dataset: {e}") from None
    features = builder.info.features
    if (set(features.keys()) != {*FEATURE_NAMES, _modality(builder.info)}
        or "display_names" not in (builder.info.metadata or {})):
      raise sources.DataError(f"{self.dataset_dir}: not built by bridle_jax.data.tfds_builder")
    return builder

  def __len__(self) -> int:
    return self._num_records

  def __getitem__(self, index: int) -> dict:
    if self._records is None:
      self._records = self._open_builder().as_data_source(self.split)
    example = self._records[sources.check_index(index, self._num_records)]
    return {"path": example["path"].decode(), "audio": example[self.modality],
            "labels": np.asarray(example["labels"], np.int32), "fold": int(example["fold"])}

  def label_table(self) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets): clip i has class indices values[offsets[i]:offsets[i + 1]]."""
    path = os.path.join(self.dataset_dir, self.split + LABEL_TABLE_SUFFIX)
    with np.load(path) as table:
      return table["values"], table["offsets"]

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_records": None}


def _modality(info) -> str:
  """The modality a dataset was built for (builds without it in the metadata hold audio)."""
  return (info.metadata or {}).get("modality", "audio")


def _read_files(paths, modality: str, num_threads: int):
  """Yields (bytes, problem) per path, in order, reading up to 2 * num_threads ahead."""
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque()
    for path in paths:
      pending.append(pool.submit(_read_file, path, modality))
      if len(pending) > 2 * num_threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _read_file(path: str, modality: str) -> tuple[bytes, str]:
  """(file bytes, "") or (b"", why the file is unusable). Only the header is checked."""
  try:
    with open(path, "rb") as f:
      encoded = f.read()
  except OSError as e:
    return b"", f"cannot read: {e.strerror or e}"
  if modality == "image":
    try:
      with Image.open(io.BytesIO(encoded)):
        pass
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      return b"", f"not a readable image file: {e}"
    return encoded, ""
  try:
    sf.info(io.BytesIO(encoded))
  except sf.LibsndfileError as e:
    return b"", f"not a readable audio file: {e.error_string}"
  return encoded, ""


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      description="Build a JSON manifest or a class folder into TFDS ArrayRecord shards.")
  parser.add_argument("--manifest", required=True,
                      help="JSON manifest (AudioMAE/AST layout), or a folder root/<class>/<file>")
  parser.add_argument("--label_csv", default="",
                      help="class_labels_indices.csv (JSON manifests only)")
  parser.add_argument("--modality", default="audio", choices=sorted(BUILDERS),
                      help="what the files are")
  parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
  parser.add_argument("--split", default="train", help="split name of the manifest's clips")
  parser.add_argument("--name", default="",
                      help="dataset name (default: the manifest's file stem or folder's name)")
  parser.add_argument("--clips_per_shard", type=int, default=1024,
                      help="clips per ArrayRecord shard (a shard is buffered in memory)")
  parser.add_argument("--read_threads", type=int, default=8, help="parallel file reads")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing build")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    dataset_dir = build_array_record(
        args.manifest, args.label_csv, args.data_dir, args.split, name=args.name,
        modality=args.modality, clips_per_shard=args.clips_per_shard,
        read_threads=args.read_threads, overwrite=args.overwrite)
  except sources.DataError as e:
    parser.exit(1, f"error: {e}\n")
  print(dataset_dir)


if __name__ == "__main__":
  main()
