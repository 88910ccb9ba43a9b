"""Tests for the bundled demo corpus generator (bridle_jax.data.demo)."""
import collections
import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf

from bridle_jax.data import demo

SMALL = dict(clips_per_class=4, eval_clips_per_class=2, clip_seconds=1.5, seed=3)


def _files(root):
  """{relative path: bytes} of every file under `root`."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def _manifest(paths, split):
  with open(paths[split]) as f:
    return json.load(f)["data"]


def _identity(path):
  st = os.stat(path)
  return st.st_ino, st.st_mtime_ns


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("demo")
  return out_dir, demo.write_demo_corpus(out_dir, clips_per_class=8, eval_clips_per_class=4,
                                         seed=1)


def test_same_seed_gives_byte_identical_corpus(tmp_path):
  demo.write_demo_corpus(tmp_path / "a", **SMALL)
  demo.write_demo_corpus(tmp_path / "b", **SMALL)
  first = _files(tmp_path / "a")
  assert first == _files(tmp_path / "b")
  expected = {"train.json", "eval.json", demo.LABEL_CSV_NAME, demo.STAMP_NAME}
  assert {p for p in first if not p.startswith("audio")} == expected
  assert sum(p.endswith(".wav") for p in first) == len(demo.CLASSES) * 6


def test_different_seed_changes_every_clip(tmp_path):
  base = demo.write_demo_corpus(tmp_path / "a", **SMALL)
  other = demo.write_demo_corpus(tmp_path / "b", **{**SMALL, "seed": 4})
  for entry in _manifest(base, "train"):
    wave_a, _ = sf.read(os.path.join(tmp_path / "a", entry["wav"]))
    wave_b, _ = sf.read(os.path.join(tmp_path / "b", entry["wav"]))
    assert not np.array_equal(wave_a, wave_b), entry["wav"]
  assert _manifest(base, "train") == _manifest(other, "train")


def test_clip_rng_depends_on_the_whole_clip_identity():
  def draw(*key):
    return demo.clip_rng(*key).integers(2**62)

  base = ("train", demo.CLASSES[0].mid, 0)
  assert draw(0, *base) == draw(0, *base)
  variants = [(1, *base), (0, "eval", *base[1:]), (0, "train", demo.CLASSES[1].mid, 0),
              (0, "train", demo.CLASSES[0].mid, 1)]
  assert len({draw(0, *base)} | {draw(*v) for v in variants}) == 5


def test_classes_and_folds_are_balanced(corpus):
  _, paths = corpus
  assert len(demo.CLASSES) >= 8
  for split, per_class in (("train", 8), ("eval", 4)):
    entries = _manifest(paths, split)
    counts = collections.Counter(e["labels"] for e in entries)
    assert counts == {c.mid: per_class for c in demo.CLASSES}
    for sound_class in demo.CLASSES:
      folds = collections.Counter(e["fold"] for e in entries if e["labels"] == sound_class.mid)
      assert set(folds) <= set(range(1, demo.NUM_FOLDS + 1))
      assert max(folds.values()) - min(folds.values()) <= 1
      assert sum(folds.values()) == per_class and len(folds) == min(per_class, demo.NUM_FOLDS)


def test_manifests_point_to_files_and_labels_are_in_csv(corpus):
  out_dir, paths = corpus
  with open(paths["label_csv"], newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["index", "mid", "display_name"]
  assert rows[1:] == [[str(i), c.mid, c.display_name] for i, c in enumerate(demo.CLASSES)]
  assert any("," in c.display_name for c in demo.CLASSES)  # exercises CSV quoting
  mids = {row[1] for row in rows[1:]}
  assert len(mids) == len(rows) - 1
  wavs = set()
  for split in ("train", "eval"):
    for entry in _manifest(paths, split):
      assert set(entry) == {"wav", "labels", "fold"}
      assert not os.path.isabs(entry["wav"])
      assert os.path.isfile(os.path.join(os.path.dirname(paths[split]), entry["wav"]))
      assert entry["labels"] in mids
      wavs.add(entry["wav"])
  assert len(wavs) == len(demo.CLASSES) * 12
  assert not [n for n in _files(out_dir) if os.path.basename(n).startswith(".tmp")]


def test_wavs_are_16k_mono_pcm16_unclipped_and_audible(corpus):
  out_dir, paths = corpus
  for entry in _manifest(paths, "train") + _manifest(paths, "eval"):
    path = os.path.join(out_dir, entry["wav"])
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (
        16000, 1, "PCM_16", 24000)
    wave, _ = sf.read(path, dtype="int16")
    peak_dbfs = 20 * np.log10(np.max(np.abs(wave.astype(np.float64))) / 32768)
    assert -30.5 < peak_dbfs < -5.9, (path, peak_dbfs)
    assert np.std(wave) > 10, path
    visible = int(demo.VISIBLE_SECONDS * 16000)  # the event lies where the demo reads
    loudest = np.sqrt(np.mean(wave[:visible].astype(np.float64).reshape(-1, 1280) ** 2, 1))
    assert loudest.max() > 1.5 * np.sqrt(np.mean(wave[visible:].astype(np.float64) ** 2))


def _autocorrelation_features(path, max_lag_frames=20, max_lag_bins=6):
  """Time- and pitch-shift-invariant clip summary: the 2-D autocorrelation (small lags) of
  the spectrogram's excess over its per-bin median, i.e. of the event above the background."""
  wave, _ = sf.read(path)
  frames = np.lib.stride_tricks.sliding_window_view(wave, 400)[::160] * np.hanning(400)
  db = 10 * np.log10(np.abs(np.fft.rfft(frames, axis=1))[:, :180] ** 2 + 1e-12)
  excess = np.maximum(db - np.median(db, axis=0) - 3, 0)
  shape = (2 * excess.shape[0], 2 * excess.shape[1])
  auto = np.fft.irfft2(np.abs(np.fft.rfft2(excess, s=shape)) ** 2, s=shape)
  auto /= auto[0, 0]
  lags = np.concatenate([auto[:max_lag_frames + 1, -max_lag_bins:],
                         auto[:max_lag_frames + 1, :max_lag_bins + 1]], axis=1)
  return lags.ravel()


def test_classes_are_separable_from_spectrograms(corpus):
  """1-nearest-neighbour on a generic spectrogram feature, train -> eval, beats chance."""
  out_dir, paths = corpus
  data = {}
  for split in ("train", "eval"):
    entries = _manifest(paths, split)
    features = np.stack([_autocorrelation_features(os.path.join(out_dir, e["wav"]))
                         for e in entries])
    data[split] = features, np.array([e["labels"] for e in entries])
  (train_x, train_y), (eval_x, eval_y) = data["train"], data["eval"]
  distances = ((eval_x[:, None] - train_x[None]) ** 2).sum(-1)
  accuracy = np.mean(train_y[np.argmin(distances, axis=1)] == eval_y)
  assert accuracy > 0.5, f"accuracy {accuracy:.2f}, chance {1 / len(demo.CLASSES):.2f}"


def test_second_call_reuses_complete_corpus(tmp_path):
  paths = demo.write_demo_corpus(tmp_path, **SMALL)
  watched = [paths["train"], paths["label_csv"], tmp_path / demo.STAMP_NAME,
             os.path.join(tmp_path, _manifest(paths, "eval")[0]["wav"])]
  before = [_identity(p) for p in watched]
  assert demo.write_demo_corpus(tmp_path, **SMALL) == paths
  assert [_identity(p) for p in watched] == before


def test_missing_stamp_triggers_rewrite(tmp_path):
  paths = demo.write_demo_corpus(tmp_path, **SMALL)
  reference = _files(tmp_path)
  wav = os.path.join(tmp_path, _manifest(paths, "train")[0]["wav"])
  with open(wav, "r+b") as f:  # a half-written clip left by an interrupted run
    f.truncate(1000)
  os.remove(tmp_path / demo.STAMP_NAME)
  before = _identity(paths["train"])
  demo.write_demo_corpus(tmp_path, **SMALL)
  assert _identity(paths["train"]) != before
  assert _files(tmp_path) == reference


def test_changed_arguments_trigger_rewrite(tmp_path):
  demo.write_demo_corpus(tmp_path, **SMALL)
  paths = demo.write_demo_corpus(tmp_path, **{**SMALL, "clips_per_class": 2})
  assert len(_manifest(paths, "train")) == 2 * len(demo.CLASSES)
  with open(tmp_path / demo.STAMP_NAME) as f:
    assert json.load(f)["clips_per_class"] == 2


def test_interrupted_run_leaves_no_partial_files_and_resumes(tmp_path, monkeypatch):
  replace = os.replace
  calls = []

  def failing_replace(src, dst):
    calls.append(dst)
    if len(calls) > 5:
      raise RuntimeError("interrupted")
    replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(RuntimeError, match="interrupted"):
    demo.write_demo_corpus(tmp_path / "x", **SMALL)
  monkeypatch.setattr(os, "replace", replace)
  assert sorted(_files(tmp_path / "x")) == sorted(
      os.path.relpath(p, tmp_path / "x") for p in calls[:5])
  demo.write_demo_corpus(tmp_path / "x", **SMALL)
  demo.write_demo_corpus(tmp_path / "y", **SMALL)
  assert _files(tmp_path / "x") == _files(tmp_path / "y")


def test_interrupted_rewrite_does_not_reuse_mixed_corpus(tmp_path, monkeypatch):
  demo.write_demo_corpus(tmp_path / "x", **SMALL)
  replace = os.replace
  calls = []

  def failing_replace(src, dst):
    calls.append(dst)
    if len(calls) > 3:
      raise RuntimeError("interrupted")
    replace(src, dst)

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(RuntimeError, match="interrupted"):
    demo.write_demo_corpus(tmp_path / "x", **{**SMALL, "seed": 4})
  monkeypatch.setattr(os, "replace", replace)
  assert not os.path.exists(tmp_path / "x" / demo.STAMP_NAME)
  demo.write_demo_corpus(tmp_path / "x", **SMALL)
  demo.write_demo_corpus(tmp_path / "y", **SMALL)
  assert _files(tmp_path / "x") == _files(tmp_path / "y")


def test_every_class_has_its_own_sound():
  events = [c.synthesize(np.random.default_rng(0), 8000, 16000) for c in demo.CLASSES]
  for i, event in enumerate(events):
    assert np.all(np.isfinite(event)) and np.std(event) > 0, demo.CLASSES[i].mid
    for j in range(i):
      assert not np.allclose(event, events[j]), (demo.CLASSES[i].mid, demo.CLASSES[j].mid)


def test_rejects_unusable_arguments(tmp_path):
  for bad in (dict(clips_per_class=0), dict(sample_rate=8000), dict(clip_seconds=0.1),
              dict(seed=-1)):
    with pytest.raises(ValueError):
      demo.write_demo_corpus(tmp_path, **bad)


def test_cli_writes_corpus_and_prints_paths(tmp_path, capsys):
  demo.main(["--out_dir", str(tmp_path), "--clips_per_class", "1",
             "--eval_clips_per_class", "1", "--seed", "2"])
  printed = capsys.readouterr().out
  assert str(tmp_path / "train.json") in printed
  assert str(tmp_path / demo.LABEL_CSV_NAME) in printed
  with open(tmp_path / demo.STAMP_NAME) as f:
    assert json.load(f)["seed"] == 2
