"""Data sources: label maps, AudioMAE/AST JSON manifests, class folders and built TFDS sets.

A source is a grain random-access data source (`len(source)`, `source[i]`) whose records
are plain, picklable dicts:

  {'path': str,            absolute file path (the original path string for TFDS)
   'audio': bytes,         encoded file bytes (audio, or an image); b'' means "read `path`"
   'labels': np.ndarray,   int32 class indices, possibly empty
   'fold': int}            manifest `fold`, -1 when absent

Every source also has `class_names` (display names in index order), `label_ids` (mids)
and `label_table()`, the labels of all clips without reading any audio.
"""
import csv
import dataclasses
import functools
import itertools
import json
import operator
import os
from typing import Sequence

import numpy as np

from bridle_jax.data import inputs

FORMATS = ("json", "folder", "tfds")
LABEL_CSV_COLUMNS = ("index", "mid", "display_name")


class DataError(ValueError):
  """A manifest, label csv, data folder or data config that cannot be used."""


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Class ids (AudioSet mids) and display names, in class-index order."""
  mids: tuple[str, ...]
  display_names: tuple[str, ...]

  @functools.cached_property
  def _index_of_mid(self) -> dict[str, int]:
    return {mid: i for i, mid in enumerate(self.mids)}

  def index(self, mid: str) -> int:
    """The class index of `mid`; KeyError when unknown."""
    return self._index_of_mid[mid]


def load_label_map(csv_path: str) -> LabelMap:
  """Reads an AudioSet-style `class_labels_indices.csv` (index, mid, display_name)."""
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      rows = list(csv.reader(f, skipinitialspace=True))  # `0, /m/x, "Name, with comma"`
  except FileNotFoundError:
    raise DataError(f"{csv_path}: file not found") from None
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DataError(f"{csv_path}: cannot read label csv: {e}") from None
  if not rows:
    raise DataError(f"{csv_path}: empty label csv (expected header index,mid,display_name)")
  header = [name.strip() for name in rows[0]]
  missing = [name for name in LABEL_CSV_COLUMNS if name not in header]
  if missing:
    raise DataError(f"{csv_path}: line 1: missing column(s) {', '.join(missing)} "
                    f"(header is {','.join(header)})")
  columns = [header.index(name) for name in LABEL_CSV_COLUMNS]
  mids, display_names, line_of_mid = [], [], {}
  for line, row in enumerate(rows[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    if len(row) != len(header):
      raise DataError(f"{csv_path}: line {line}: expected {len(header)} fields, got {len(row)} "
                      "(quote display names that contain commas)")
    index, mid, display_name = (row[c].strip() for c in columns)
    try:
      index_value = int(index)
    except ValueError:
      raise DataError(f"{csv_path}: line {line}: index {index!r} is not an integer") from None
    if index_value != len(mids):
      raise DataError(f"{csv_path}: line {line}: index {index_value}, expected {len(mids)} "
                      "(indices must run 0, 1, 2, ... in order)")
    if not mid:
      raise DataError(f"{csv_path}: line {line}: empty mid")
    if mid in line_of_mid:
      raise DataError(f"{csv_path}: line {line}: duplicate mid {mid!r} "
                      f"(first on line {line_of_mid[mid]})")
    line_of_mid[mid] = line
    mids.append(mid)
    display_names.append(display_name)
  if not mids:
    raise DataError(f"{csv_path}: no classes after the header")
  return LabelMap(tuple(mids), tuple(display_names))


class PackedSource:
  """Records held in a few flat arrays: compact and quick to pickle at millions of clips."""

  def __init__(self, paths: Sequence[str], labels: Sequence[Sequence[int]],
               folds: Sequence[int], label_map: LabelMap):
    self.label_ids = list(label_map.mids)
    self.class_names = list(label_map.display_names)
    encoded_paths = [os.fsencode(path) for path in paths]
    self._path_blob = b"".join(encoded_paths)
    self._path_offsets = _offsets(len(p) for p in encoded_paths)
    self._label_values = np.fromiter(itertools.chain.from_iterable(labels), np.int32)
    self._label_offsets = _offsets(len(clip_labels) for clip_labels in labels)
    self._folds = np.asarray(folds, np.int32)

  def __len__(self) -> int:
    return len(self._folds)

  def __getitem__(self, index: int) -> dict:
    index = check_index(index, len(self))
    start, end = self._path_offsets[index:index + 2]
    label_start, label_end = self._label_offsets[index:index + 2]
    return {"path": os.fsdecode(self._path_blob[start:end]), "audio": b"",
            "labels": self._label_values[label_start:label_end].copy(),
            "fold": int(self._folds[index])}

  def label_table(self) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets): clip i has class indices values[offsets[i]:offsets[i + 1]]."""
    return self._label_values, self._label_offsets


class JsonManifestSource(PackedSource):
  """An AudioMAE/AST JSON manifest: `{"data": [entry, ...]}` or a bare list of entries.

  An entry is {"wav": path, "labels": "mid1,mid2", "fold": int (optional)}; image
  manifests name the file "image" instead of "wav" (`file_key`). A leading ~
  is the home directory; relative paths resolve against the directory the manifest file
  really is in (symbolic links followed, as opening "<dir>/../x.wav" would); a missing or
  empty "labels" marks an unlabelled clip. Everything is validated here; audio files are
  not opened.
  """

  def __init__(self, manifest_path: str, label_map: LabelMap, file_key: str = "wav"):
    self.manifest_path = os.path.abspath(manifest_path)
    entries = _read_json_entries(self.manifest_path)
    base_dir = os.path.dirname(os.path.realpath(self.manifest_path))
    paths, labels, folds = [], [], []
    for i, entry in enumerate(entries):
      where = f"{self.manifest_path}: entry {i}"
      if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
      path = entry.get(file_key)
      if not isinstance(path, str) or not path:
        raise DataError(f"{where}: {file_key!r} must be a non-empty string, got {path!r}")
      paths.append(os.path.normpath(os.path.join(base_dir, os.path.expanduser(path))))
      labels.append(_parse_labels(entry.get("labels", ""), label_map, where))
      folds.append(_parse_fold(entry.get("fold"), where))
    super().__init__(paths, labels, folds, label_map)


class FolderSource(PackedSource):
  """A folder-per-class layout root/<class>/<file>, searched recursively per class.

  Classes are the sorted class folder names (both mid and display name); files are
  sorted for a deterministic order. Folds are -1.
  """

  def __init__(self, root: str, extensions: Sequence[str] = inputs.EXTENSIONS["audio"]):
    self.root = os.path.abspath(root)
    if not os.path.isdir(self.root):
      raise DataError(f"{self.root}: not a directory")
    suffixes = tuple(ext.lower() for ext in extensions)
    class_dirs = sorted(entry.name for entry in os.scandir(self.root)
                        if entry.is_dir() and not entry.name.startswith("."))
    paths, labels = [], []
    for class_index, class_dir in enumerate(class_dirs):
      for path in _find_files(os.path.join(self.root, class_dir), suffixes):
        paths.append(path)
        labels.append((class_index,))
    if not paths:
      raise DataError(f"{self.root}: no files ({', '.join(suffixes)}) in class folders "
                      "(expected root/<class>/<file>)")
    names = tuple(class_dirs)
    super().__init__(paths, labels, [-1] * len(paths), LabelMap(names, names))


def open_source(data_config, base_dir: str = "."):
  """The source that `data_config` (format, manifest, label_csv) describes.

  Relative paths resolve against `base_dir`; label_csv is only read for "json" (folder
  and TFDS sources carry their own class names). `data.modality` picks the manifest's
  file field and the file types of a class folder, and must be what a TFDS set holds.
  """
  data_format = data_config.format
  modality = inputs.modality(data_config)
  if data_format not in FORMATS:
    raise DataError(f"data.format: unknown format {data_format!r} (known: {', '.join(FORMATS)})")
  if data_format == "json":
    manifest = _config_path(data_config, "manifest", base_dir, want_dir=False)
    label_csv = _config_path(data_config, "label_csv", base_dir, want_dir=False)
    return JsonManifestSource(manifest, load_label_map(label_csv),
                              file_key=inputs.MANIFEST_FILE_KEY[modality])
  manifest = _config_path(data_config, "manifest", base_dir, want_dir=True)
  if data_format == "folder":
    return FolderSource(manifest, inputs.EXTENSIONS[modality])
  from bridle_jax.data import tfds_builder  # Deferred: it imports this module and tfds.
  source = tfds_builder.TfdsSource(manifest)
  if source.modality != modality:
    raise DataError(f"data.manifest: {manifest} holds {source.modality} files, and "
                    f"data.modality is {modality!r}")
  return source


def label_statistics(source) -> dict:
  """Clip and class counts of a source, from its label table (no audio is read)."""
  values, offsets = source.label_table()
  labels_per_clip = np.diff(offsets)
  return {
      "num_clips": len(source),
      "num_classes": len(source.class_names),
      "clips_per_class": np.bincount(values, minlength=len(source.class_names)),
      "num_unlabelled": int(np.count_nonzero(labels_per_clip == 0)),
      "max_labels_per_clip": int(labels_per_clip.max(initial=0)),
  }


def _offsets(lengths) -> np.ndarray:
  return np.concatenate([[0], np.cumsum(np.fromiter(lengths, np.int64))])


def check_index(index: int, length: int) -> int:
  """`index` as a non-negative int below `length` (negative ones count from the end)."""
  index = operator.index(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"record index {index} out of range for {length} records")
  return index


def _read_json_entries(manifest_path: str) -> list:
  try:
    with open(manifest_path, encoding="utf-8-sig") as f:  # a byte-order mark is skipped
      content = json.load(f)
  except FileNotFoundError:
    raise DataError(f"{manifest_path}: file not found") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{manifest_path}: invalid JSON: {e}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{manifest_path}: cannot read manifest: {e}") from None
  entries = content.get("data") if isinstance(content, dict) else content
  if not isinstance(entries, list):
    raise DataError(f"{manifest_path}: expected a list of entries or {{\"data\": [...]}}")
  if not entries:
    raise DataError(f"{manifest_path}: no entries")
  return entries


def _parse_labels(labels, label_map: LabelMap, where: str) -> tuple[int, ...]:
  if not isinstance(labels, str):
    raise DataError(f"{where}: 'labels' must be a comma-separated string, got {labels!r}")
  indices = {}
  for mid in labels.split(","):
    mid = mid.strip()
    if not mid:
      continue
    try:
      indices[label_map.index(mid)] = None
    except KeyError:
      raise DataError(f"{where}: unknown label {mid!r} (not in the label csv)") from None
  return tuple(indices)


def _parse_fold(fold, where: str) -> int:
  if fold is None:
    return -1
  if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
    raise DataError(f"{where}: 'fold' must be a non-negative integer, got {fold!r}")
  return fold


def _find_files(directory: str, suffixes: tuple[str, ...]) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(directory):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    found.extend(os.path.join(dirpath, name) for name in filenames
                 if name.lower().endswith(suffixes) and not name.startswith("."))
  return sorted(found)


def _config_path(data_config, field: str, base_dir: str, want_dir: bool) -> str:
  value = getattr(data_config, field)
  if not value:
    raise DataError(f"data.{field}: not set (required for data.format={data_config.format!r})")
  path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
  if want_dir and not os.path.isdir(path):
    raise DataError(f"data.{field}: directory not found: {path}")
  if not want_dir and not os.path.isfile(path):
    raise DataError(f"data.{field}: file not found: {path}")
  return path
