"""Data sources: label csv, JSON manifests, class folders, open_source and TFDS ArrayRecord."""
import fcntl
import json
import os
import pickle
import shutil

import ml_collections
import numpy as np
import pytest
import soundfile as sf

from bridle_jax.data import sources
from bridle_jax.data import tfds_builder

LABEL_CSV = ('index,mid,display_name\n'
             '0,/m/dog,"Dog, bark"\n'
             '1,/m/cat,Cat\n'
             '2,/m/bird,"Bird ""song"""\n')


def _write_wav(path, seed: int) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  wave = np.random.default_rng(seed).uniform(-0.5, 0.5, 800 + seed).astype(np.float32)
  sf.write(path, wave, 16000)


def _write(path, text: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return str(path)


def _write_json(path, content) -> str:
  return _write(path, json.dumps(content))


def _label_map(tmp_path) -> sources.LabelMap:
  return sources.load_label_map(_write(tmp_path / "labels.csv", LABEL_CSV))


def _data_config(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(format="json", manifest="", label_csv=""), **fields))


def test_label_csv_keeps_quoted_display_names(tmp_path):
  label_map = _label_map(tmp_path)
  assert label_map.mids == ("/m/dog", "/m/cat", "/m/bird")
  assert label_map.display_names == ("Dog, bark", "Cat", 'Bird "song"')
  assert label_map.index("/m/bird") == 2
  with pytest.raises(KeyError):
    label_map.index("/m/cow")


def test_label_csv_with_a_space_after_each_comma(tmp_path):
  csv_path = _write(tmp_path / "spaced.csv", 'index, mid, display_name\n'
                    '0, /m/a, "Speech"\n1, /m/b, "Dog, bark"\n')
  label_map = sources.load_label_map(csv_path)
  assert label_map.mids == ("/m/a", "/m/b")
  assert label_map.display_names == ("Speech", "Dog, bark")


@pytest.mark.parametrize("text, message", [
    ("index,mid\n0,/m/a\n", "line 1: missing column(s) display_name"),
    ("index,mid,display_name\n0,/m/a,A\nx,/m/b,B\n", "line 3: index 'x' is not an integer"),
    ("index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n", "line 3: index 2, expected 1"),
    ("index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n", "line 3: duplicate mid '/m/a' (first on line 2)"),
])
def test_bad_label_csv_names_file_and_line(tmp_path, text, message):
  path = _write(tmp_path / "bad.csv", text)
  with pytest.raises(sources.DataError) as error:
    sources.load_label_map(path)
  assert str(error.value).startswith(f"{path}: {message}")


def test_missing_label_csv_names_file(tmp_path):
  with pytest.raises(sources.DataError, match="nope.csv: file not found"):
    sources.load_label_map(str(tmp_path / "nope.csv"))


def test_json_manifest_dict_form(tmp_path):
  absolute = str(tmp_path / "elsewhere" / "abs.wav")
  manifest = _write_json(tmp_path / "sub" / "train.json", {"data": [
      {"wav": "audio/a.wav", "labels": "/m/dog", "fold": 3},
      {"wav": absolute, "labels": "/m/bird, /m/dog"},
      {"wav": "../b.flac", "labels": ""},
  ]})
  source = sources.JsonManifestSource(manifest, _label_map(tmp_path))
  assert len(source) == 3
  assert source.class_names == ["Dog, bark", "Cat", 'Bird "song"']
  assert source.label_ids == ["/m/dog", "/m/cat", "/m/bird"]
  first, second, third = source[0], source[1], source[-1]
  assert first["path"] == str(tmp_path / "sub" / "audio" / "a.wav")
  assert first["audio"] == b""
  assert first["labels"].dtype == np.int32 and first["labels"].tolist() == [0]
  assert first["fold"] == 3
  assert second["path"] == absolute
  assert second["labels"].tolist() == [2, 0]
  assert second["fold"] == -1
  assert third["path"] == str(tmp_path / "b.flac")
  assert third["labels"].tolist() == []
  with pytest.raises(IndexError):
    source[3]


def test_json_manifest_with_a_byte_order_mark(tmp_path):
  manifest = tmp_path / "bom.json"
  manifest.write_bytes(b"\xef\xbb\xbf" + json.dumps(
      {"data": [{"wav": "x.wav", "labels": "/m/cat"}]}).encode())
  source = sources.JsonManifestSource(str(manifest), _label_map(tmp_path))
  assert source[0]["labels"].tolist() == [1]


def test_json_manifest_paths_with_home_and_a_linked_manifest_directory(tmp_path, monkeypatch):
  """~ is the home directory; '..' from a manifest reached through a linked directory goes
  where opening the file would, next to the directory the link points at."""
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  _write_json(tmp_path / "real" / "set" / "train.json", {"data": [
      {"wav": "~/clips/a.wav", "labels": "/m/dog"}, {"wav": "../audio/b.wav", "labels": ""}]})
  os.symlink(tmp_path / "real" / "set", tmp_path / "link")
  source = sources.JsonManifestSource(str(tmp_path / "link" / "train.json"), _label_map(tmp_path))
  assert source[0]["path"] == str(tmp_path / "home" / "clips" / "a.wav")
  assert source[1]["path"] == str(tmp_path / "real" / "audio" / "b.wav")


def test_json_manifest_bare_list_form(tmp_path):
  manifest = _write_json(tmp_path / "train.json", [
      {"wav": "x.wav", "labels": "/m/cat,/m/bird"}, {"wav": "y.wav", "labels": "/m/dog"}])
  source = sources.JsonManifestSource(manifest, _label_map(tmp_path))
  assert [source[i]["path"] for i in range(2)] == [str(tmp_path / "x.wav"),
                                                   str(tmp_path / "y.wav")]
  assert [source[i]["labels"].tolist() for i in range(2)] == [[1, 2], [0]]


def test_unknown_label_names_label_entry_and_file(tmp_path):
  manifest = _write_json(tmp_path / "train.json", [
      {"wav": "x.wav", "labels": "/m/dog"}, {"wav": "y.wav", "labels": "/m/dog,/m/cow"}])
  with pytest.raises(sources.DataError) as error:
    sources.JsonManifestSource(manifest, _label_map(tmp_path))
  assert str(error.value) == f"{manifest}: entry 1: unknown label '/m/cow' (not in the label csv)"


@pytest.mark.parametrize("entry, message", [
    (["x.wav"], "expected an object, got list"),
    ({"labels": "/m/dog"}, "'wav' must be a non-empty string"),
    ({"wav": "x.wav", "labels": ["/m/dog"]}, "'labels' must be a comma-separated string"),
    ({"wav": "x.wav", "labels": "/m/dog", "fold": "2"}, "'fold' must be a non-negative integer"),
])
def test_malformed_entry_names_entry_index_and_file(tmp_path, entry, message):
  manifest = _write_json(tmp_path / "train.json",
                         {"data": [{"wav": "ok.wav", "labels": "/m/cat"}, entry]})
  with pytest.raises(sources.DataError) as error:
    sources.JsonManifestSource(manifest, _label_map(tmp_path))
  assert str(error.value).startswith(f"{manifest}: entry 1: {message}")


def test_invalid_json_names_file(tmp_path):
  manifest = _write(tmp_path / "train.json", '{"data": [')
  with pytest.raises(sources.DataError, match=f"^{manifest}: invalid JSON"):
    sources.JsonManifestSource(manifest, _label_map(tmp_path))


def test_open_source_resolves_against_base_dir(tmp_path):
  _write(tmp_path / "labels.csv", LABEL_CSV)
  _write_json(tmp_path / "train.json", [{"wav": "x.wav", "labels": "/m/cat"}])
  source = sources.open_source(
      _data_config(manifest="train.json", label_csv="labels.csv"), base_dir=str(tmp_path))
  assert isinstance(source, sources.JsonManifestSource)
  assert source[0]["path"] == str(tmp_path / "x.wav")
  assert source[0]["labels"].tolist() == [1]


def test_open_source_missing_manifest_names_config_field(tmp_path):
  _write(tmp_path / "labels.csv", LABEL_CSV)
  config = _data_config(manifest="train.json", label_csv="labels.csv")
  with pytest.raises(sources.DataError) as error:
    sources.open_source(config, base_dir=str(tmp_path))
  assert str(error.value) == f"data.manifest: file not found: {tmp_path / 'train.json'}"
  _write_json(tmp_path / "train.json", [{"wav": "x.wav", "labels": "/m/cat"}])
  with pytest.raises(sources.DataError, match="^data.label_csv: file not found"):
    sources.open_source(_data_config(manifest="train.json", label_csv="missing.csv"),
                        base_dir=str(tmp_path))


def test_open_source_unknown_format_names_data_format():
  with pytest.raises(sources.DataError, match="^data.format: unknown format 'csv'"):
    sources.open_source(_data_config(format="csv"))


def test_folder_source_classes_files_and_labels(tmp_path):
  root = tmp_path / "root"
  for path in ("dog/b.wav", "dog/a.flac", "cat/deep/c.WAV", "bird/x.wav"):
    _write(root / path, "")
  _write(root / "cat" / "notes.txt", "")
  os.makedirs(root / "empty")
  source = sources.FolderSource(str(root))
  assert source.class_names == source.label_ids == ["bird", "cat", "dog", "empty"]
  records = [source[i] for i in range(len(source))]
  assert [r["path"] for r in records] == [str(root / p) for p in (
      "bird/x.wav", "cat/deep/c.WAV", "dog/a.flac", "dog/b.wav")]
  assert [r["labels"].tolist() for r in records] == [[0], [1], [2], [2]]
  assert {r["fold"] for r in records} == {-1}
  folder_source = sources.open_source(_data_config(format="folder", manifest="root"),
                                      base_dir=str(tmp_path))
  assert len(folder_source) == 4


def test_folder_source_without_audio_raises(tmp_path):
  os.makedirs(tmp_path / "root" / "dog")
  with pytest.raises(sources.DataError, match="no files"):
    sources.FolderSource(str(tmp_path / "root"))


def test_sources_pickle(tmp_path):
  manifest = _write_json(tmp_path / "train.json", [
      {"wav": "x.wav", "labels": "/m/cat,/m/bird", "fold": 1}, {"wav": "y.wav", "labels": ""}])
  _write(tmp_path / "root" / "dog" / "a.wav", "")
  for source in (sources.JsonManifestSource(manifest, _label_map(tmp_path)),
                 sources.FolderSource(str(tmp_path / "root"))):
    restored = pickle.loads(pickle.dumps(source))
    assert restored.class_names == source.class_names
    assert restored.label_ids == source.label_ids
    assert len(restored) == len(source)
    for i in range(len(source)):
      expected, got = source[i], restored[i]
      assert got["path"] == expected["path"] and got["fold"] == expected["fold"]
      np.testing.assert_array_equal(got["labels"], expected["labels"])


def test_label_statistics(tmp_path):
  manifest = _write_json(tmp_path / "train.json", [
      {"wav": "a.wav", "labels": "/m/cat,/m/bird"}, {"wav": "b.wav", "labels": "/m/cat"},
      {"wav": "c.wav", "labels": ""}])
  stats = sources.label_statistics(sources.JsonManifestSource(manifest, _label_map(tmp_path)))
  assert stats["num_clips"] == 3
  assert stats["num_classes"] == 3
  assert stats["clips_per_class"].tolist() == [0, 2, 1]
  assert stats["num_unlabelled"] == 1
  assert stats["max_labels_per_clip"] == 2


@pytest.fixture(scope="module")
def built_tfds(tmp_path_factory):
  """Six manifest entries (one not audio) built into ArrayRecord shards of two clips."""
  base = tmp_path_factory.mktemp("tfds")
  entries = []
  for i in range(6):
    path = base / "audio" / f"clip{i}.wav"
    _write_wav(str(path), seed=i)
    entries.append({"wav": f"audio/clip{i}.wav", "labels": ["/m/dog", "/m/cat,/m/bird", ""][i % 3],
                    "fold": i})
  _write(base / "audio" / "clip4.wav", "not audio")
  manifest = _write_json(base / "train.json", {"data": entries})
  label_csv = _write(base / "labels.csv", LABEL_CSV)
  dataset_dir = tfds_builder.build_array_record(manifest, label_csv, str(base / "built"),
                                                clips_per_shard=2)
  return base, manifest, label_csv, dataset_dir


def test_tfds_round_trip(built_tfds, tmp_path):
  base, manifest, label_csv, dataset_dir = built_tfds
  expected = [r for r in (sources.JsonManifestSource(manifest, _label_map(tmp_path))[i]
                          for i in range(6)) if not r["path"].endswith("clip4.wav")]
  source = tfds_builder.TfdsSource(dataset_dir)
  assert len(source) == 5
  assert source.class_names == ["Dog, bark", "Cat", 'Bird "song"']
  assert source.label_ids == ["/m/dog", "/m/cat", "/m/bird"]
  for record, want in zip((source[i] for i in range(5)), expected):
    assert record["path"] == want["path"]
    with open(want["path"], "rb") as f:
      assert record["audio"] == f.read()
    assert record["labels"].dtype == np.int32
    assert record["labels"].tolist() == want["labels"].tolist()
    assert record["fold"] == want["fold"]
  with open(os.path.join(dataset_dir, "metadata.json")) as f:
    metadata = json.load(f)
  assert metadata["num_skipped"] == 1
  assert metadata["skipped"][0]["path"] == str(base / "audio" / "clip4.wav")
  stats = sources.label_statistics(source)
  assert stats["clips_per_class"].tolist() == [2, 1, 1]
  assert stats["num_unlabelled"] == 2
  assert stats["max_labels_per_clip"] == 2


def test_tfds_source_pickles_and_opens_via_config(built_tfds):
  _, _, _, dataset_dir = built_tfds
  source = sources.open_source(_data_config(format="tfds", manifest=dataset_dir))
  first = source[0]
  restored = pickle.loads(pickle.dumps(source))
  assert restored.class_names == source.class_names
  assert len(restored) == 5
  assert restored[0]["audio"] == first["audio"] and restored[0]["path"] == first["path"]
  assert restored[-1]["fold"] == 5
  assert source.modality == "audio"
  with pytest.raises(sources.DataError, match="holds audio files, and data.modality is 'image'"):
    sources.open_source(_data_config(format="tfds", manifest=dataset_dir, modality="image"))


def test_a_set_built_before_sets_recorded_their_modality_opens_as_audio(built_tfds, tmp_path):
  _, _, _, dataset_dir = built_tfds
  old = shutil.copytree(dataset_dir, tmp_path / "old")
  with open(old / "metadata.json") as f:
    metadata = json.load(f)
  del metadata["modality"]
  with open(old / "metadata.json", "w") as f:
    json.dump(metadata, f)
  source = sources.open_source(_data_config(format="tfds", manifest=str(old)))
  assert source.modality == "audio" and len(source) == 5
  assert source[0]["audio"] == tfds_builder.TfdsSource(dataset_dir)[0]["audio"]


def test_tfds_build_refuses_existing_dataset_and_bad_inputs(built_tfds, monkeypatch):
  base, manifest, label_csv, dataset_dir = built_tfds
  # Refused before the manifest is read (a class folder of millions of files is walked).
  monkeypatch.setattr(sources.JsonManifestSource, "__init__", None)
  with pytest.raises(sources.DataError, match="already built"):
    tfds_builder.build_array_record(manifest, label_csv,
                                    os.path.dirname(os.path.dirname(os.path.dirname(dataset_dir))))
  monkeypatch.undo()
  with pytest.raises(sources.DataError, match="nosuch: not found"):
    tfds_builder.build_array_record(str(base / "nosuch"), "", str(base / "x"))
  with pytest.raises(sources.DataError, match="a class folder's classes are its folder names"):
    tfds_builder.build_array_record(str(base / "audio"), label_csv, str(base / "x"))
  with pytest.raises(sources.DataError, match="a JSON manifest needs a label csv"):
    tfds_builder.build_array_record(manifest, "", str(base / "x"))


def test_a_dataset_built_with_another_split_name_opens_through_the_config(built_tfds):
  base, manifest, label_csv, train_dir = built_tfds
  dataset_dir = tfds_builder.build_array_record(manifest, label_csv, str(base / "built_eval"),
                                                split="eval", name="held_out")
  source = sources.open_source(_data_config(format="tfds", manifest=dataset_dir))
  train = tfds_builder.TfdsSource(train_dir)
  assert source.split == "eval" and train.split == "train" and len(source) == len(train)
  for got, want in zip(source.label_table(), train.label_table()):
    np.testing.assert_array_equal(got, want)
  assert source[-1]["path"] == train[-1]["path"]


def test_a_build_removes_what_an_interrupted_build_left(built_tfds):
  base, manifest, label_csv, _ = built_tfds
  parent = base / "built_again" / "audio_manifest" / "train"
  leftover = parent / "incomplete.AB12CD_1.0.0"
  leftover.mkdir(parents=True)
  (leftover / "audio_manifest-train.array_record-00000-of-00003").write_bytes(b"partial")
  dataset_dir = tfds_builder.build_array_record(manifest, label_csv, str(base / "built_again"))
  assert sorted(os.listdir(parent)) == [".1.0.0.build.lock", "1.0.0"]
  assert dataset_dir == str(parent / "1.0.0")
  assert len(tfds_builder.TfdsSource(dataset_dir)) == 5


def test_a_second_build_of_a_dataset_being_built_fails_and_leaves_the_first_alone(built_tfds):
  base, manifest, label_csv, _ = built_tfds
  parent = base / "built_twice" / "audio_manifest" / "train"
  running = parent / "incomplete.RUNNING_1.0.0"
  running.mkdir(parents=True)
  fd = os.open(parent / ".1.0.0.build.lock", os.O_RDWR | os.O_CREAT)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first build holds its lock
  try:
    with pytest.raises(sources.DataError, match="another build of this dataset is running"):
      tfds_builder.build_array_record(manifest, label_csv, str(base / "built_twice"))
    assert running.is_dir() and not (parent / "1.0.0").exists()
  finally:
    os.close(fd)
  tfds_builder.build_array_record(manifest, label_csv, str(base / "built_twice"))
  assert sorted(os.listdir(parent)) == [".1.0.0.build.lock", "1.0.0"]
