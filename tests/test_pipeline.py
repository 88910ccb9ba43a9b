"""The grain pipeline: determinism, host sharding, resumable state, bad clips."""
import json
import time

import numpy as np
import pytest
import soundfile as sf
from ml_collections import config_dict

from bridle_jax.data import audio
from bridle_jax.data import pipeline

NUM_CLIPS = 24
TARGET_FRAMES = 20


class ListSource(list):
  """A minimal random-access source: records plus class names."""
  class_names = ["tone", "noise", "click"]
  label_ids = ["/t", "/n", "/c"]


def _data_config(**overrides):
  cfg = dict(sample_rate=16000, target_length=TARGET_FRAMES, roll_mag_aug=True,
             roll_mag_gain_only=False, mixup=0.0, mixup_alpha=10.0, num_workers=0, prefetch=2)
  cfg.update(overrides)
  return config_dict.ConfigDict(cfg)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """Clips whose first sample encodes their index, so batches can be identified."""
  root = tmp_path_factory.mktemp("clips")
  rng = np.random.default_rng(0)
  source = ListSource()
  for i in range(NUM_CLIPS):
    path = root / f"clip{i:02d}.wav"
    samples = 4000 + 160 * i
    wave = 0.1 * rng.standard_normal(samples).astype(np.float32)
    sf.write(path, wave, 16000, subtype="FLOAT")
    source.append({"path": str(path), "audio": b"", "labels": np.array([i % 3], np.int32),
                   "fold": -1})
  return source


def _ids(batch):
  """Identifies each clip of a batch by its number of valid samples."""
  return [int(v) for v in batch["valid_frames"]]


def _take(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_same_seed_same_batches_other_seed_other_order(clips):
  kwargs = dict(global_batch_size=4, process_index=0, process_count=1)
  a = _take(pipeline.build_dataset(clips, _data_config(), seed=3, **kwargs), 8)
  b = _take(pipeline.build_dataset(clips, _data_config(), seed=3, **kwargs), 8)
  c = _take(pipeline.build_dataset(clips, _data_config(), seed=4, **kwargs), 8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["waveform"], y["waveform"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert any(not np.array_equal(x["waveform"], z["waveform"]) for x, z in zip(a, c))


def test_epochs_reshuffle_and_cover_every_clip(clips):
  cfg = _data_config(roll_mag_aug=False)
  ds = pipeline.build_dataset(clips, cfg, global_batch_size=4, seed=0, process_index=0,
                              process_count=1)
  batches = _take(ds, 2 * NUM_CLIPS // 4)
  # Without augmentation the first sample identifies the clip.
  firsts = [tuple(np.round(b["waveform"][:, 100], 6)) for b in batches]
  epoch1 = sorted(x for f in firsts[:6] for x in f)
  epoch2 = sorted(x for f in firsts[6:] for x in f)
  assert epoch1 == epoch2 and len(set(epoch1)) == NUM_CLIPS
  assert firsts[:6] != firsts[6:]


def test_host_shards_are_disjoint_and_cover_the_set(clips):
  cfg = _data_config(roll_mag_aug=False)
  seen = []
  for index in range(3):
    ds = pipeline.build_dataset(clips, cfg, global_batch_size=6, seed=0, process_index=index,
                                process_count=3, num_epochs=1, train=False)
    seen.append([tuple(np.round(w[100:104], 6)) for b in ds for w in b["waveform"]])
  assert sum(len(s) for s in seen) == NUM_CLIPS
  assert len(set().union(*map(set, seen))) == NUM_CLIPS


def test_hosts_shuffle_and_augment_with_their_own_randomness(clips):
  """Host h holds records h, h + 3, ...; with one seed for all, batch slot k of every host
  would hold neighbouring records, and copies of one clip would come out rolled alike."""
  def first_epoch(source, index, **overrides):
    ds = pipeline.build_dataset(source, _data_config(**overrides), global_batch_size=12,
                                seed=0, process_index=index, process_count=3)
    return _take(ds, 2)

  orders = [np.concatenate([b["index"] for b in first_epoch(clips, h)]) // 3 for h in range(3)]
  assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
  copies = ListSource([clips[0]] * NUM_CLIPS)
  rolled = [first_epoch(copies, h)[0]["waveform"] for h in range(2)]
  assert not np.array_equal(rolled[0], rolled[1])
  # Host 0 draws as a single-host run over its shard with the same seed does.
  single = pipeline.build_dataset(ListSource(clips[0::3]), _data_config(),
                                  global_batch_size=4, seed=0, process_index=0,
                                  process_count=1)
  np.testing.assert_array_equal(_take(single, 2)[1]["waveform"],
                                first_epoch(clips, 0)[1]["waveform"][:4])


def test_restored_iterator_continues_exactly(clips):
  ds = pipeline.build_dataset(clips, _data_config(mixup=0.5), global_batch_size=4, seed=1,
                              process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = iter(ds)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_restored_iterator_continues_in_worker_processes(clips):
  ds = pipeline.build_dataset(clips, _data_config(num_workers=2), global_batch_size=4, seed=1,
                              process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it)["waveform"] for _ in range(3)]
  restored = iter(ds)
  restored.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(restored)["waveform"], want)


def test_a_stream_decodes_at_most_prefetch_batches_ahead(clips, monkeypatch):
  """A stream dropped after a few batches (a short run, a phase's end, a preemption) has
  decoded little more than it used; grain alone would read 500 clips ahead."""
  decoded, load_audio = [], audio.load_audio

  def counting_load_audio(*args, **kwargs):
    decoded.append(1)
    return load_audio(*args, **kwargs)

  monkeypatch.setattr(audio, "load_audio", counting_load_audio)
  stream = pipeline.DataStream(clips, _data_config(prefetch=2), global_batch_size=4, seed=1)
  next(iter(stream))
  time.sleep(1.0)  # time enough to decode every clip many times over
  assert 4 <= len(decoded) <= 4 * (1 + 2) + 1, len(decoded)


def test_examples_are_padded_and_labelled(clips):
  cfg = _data_config(target_length=30, roll_mag_aug=False)
  batch = next(iter(pipeline.build_dataset(clips, cfg, global_batch_size=NUM_CLIPS, seed=0,
                                           process_index=0, process_count=1, train=False)))
  assert batch["waveform"].shape == (NUM_CLIPS, audio.num_samples_for_frames(30))
  assert batch["waveform"].dtype == np.float32
  expected_frames = [min(audio.num_frames(4000 + 160 * i), 30) for i in range(NUM_CLIPS)]
  assert _ids(batch) == expected_frames
  np.testing.assert_array_equal(batch["label"].argmax(1), np.arange(NUM_CLIPS) % 3)
  assert batch["label"].sum() == NUM_CLIPS


def test_mixup_mixes_labels(clips):
  cfg = _data_config(mixup=1.0)
  batch = next(iter(pipeline.build_dataset(clips, cfg, global_batch_size=8, seed=0,
                                           process_index=0, process_count=1)))
  sums = batch["label"].sum(1)
  np.testing.assert_allclose(sums[batch["label"].max(1) < 1], 1.0, rtol=1e-6)
  assert (batch["label"].max(1) < 1).any()


def test_mixup_partners_come_from_the_mixup_source(clips):
  zeros, ones = ListSource(clips[0::3]), ListSource(clips[1::3])  # classes 0 and 1
  batch = next(iter(pipeline.build_dataset(zeros, _data_config(mixup=1.0), global_batch_size=8,
                                           seed=0, process_index=0, process_count=1,
                                           mixup_source=ones)))
  assert (batch["label"][:, 1] > 0).all() and (batch["label"][:, 2] == 0).all()


def _with_bad_clips(clips, tmp_path):
  """The clips with four unreadable ones inserted in the middle."""
  (tmp_path / "empty.wav").write_bytes(b"")
  (tmp_path / "text.wav").write_text("not audio at all")
  truncated = tmp_path / "truncated.wav"
  truncated.write_bytes(open(clips[0]["path"], "rb").read()[:30])
  bad = [{"path": str(p), "audio": b"", "labels": np.array([0], np.int32), "fold": -1}
         for p in (tmp_path / "empty.wav", tmp_path / "text.wav", truncated,
                   tmp_path / "missing.wav")]
  return ListSource(clips[:10] + bad + clips[10:]), len(bad)


def test_bad_clips_are_skipped_and_counted(clips, tmp_path):
  source, num_bad = _with_bad_clips(clips, tmp_path)
  ds = pipeline.build_dataset(source, _data_config(), global_batch_size=4, seed=0,
                              process_index=0, process_count=1, num_epochs=1, train=False)
  batches = list(ds)
  assert sum(int(b["skipped"].sum()) for b in batches) == num_bad
  assert sum(len(b["waveform"]) for b in batches) == NUM_CLIPS


def test_bad_clips_are_counted_in_a_shuffled_stream(clips, tmp_path):
  source, num_bad = _with_bad_clips(clips, tmp_path)
  ds = pipeline.build_dataset(source, _data_config(), global_batch_size=4, seed=0,
                              process_index=0, process_count=1)
  # 3 epochs of good clips: the bad clips of the first two epochs all precede them.
  skipped = sum(int(b["skipped"].sum()) for b in _take(ds, 3 * NUM_CLIPS // 4))
  assert 2 * num_bad <= skipped <= 3 * num_bad


def test_a_resumed_stream_keeps_counting_the_skipped_clips(clips, tmp_path):
  source, num_bad = _with_bad_clips(clips, tmp_path)
  stream = pipeline.DataStream(source, _data_config(), global_batch_size=4, seed=0)
  steps = 3 * NUM_CLIPS // 4  # three epochs
  for _ in range(steps // 2):
    next(stream)
  saved = json.loads(json.dumps(stream.get_state()))  # as a checkpoint stores it
  resumed = pipeline.DataStream(source, _data_config(), global_batch_size=4, seed=0,
                                saved=saved)
  for _ in range(steps - steps // 2):
    next(resumed)
  uninterrupted = pipeline.DataStream(source, _data_config(), global_batch_size=4, seed=0)
  for _ in range(steps):
    next(uninterrupted)
  assert resumed.skipped_clips == uninterrupted.skipped_clips >= 2 * num_bad
  assert 0 < saved["skipped_clips"] < resumed.skipped_clips


def test_a_manifest_of_only_unreadable_clips_stops_with_an_error(tmp_path):
  source = ListSource({"path": str(tmp_path / f"gone{i}.wav"), "audio": b"",
                       "labels": np.array([0], np.int32), "fold": -1} for i in range(6))
  ds = pipeline.build_dataset(source, _data_config(), global_batch_size=2, seed=0,
                              process_index=0, process_count=1)
  with pytest.raises(ValueError, match="6 clips in a row could not be read"):
    next(iter(ds))


def test_batch_must_split_over_hosts(clips):
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.build_dataset(clips, _data_config(), global_batch_size=5, seed=0, process_index=0,
                           process_count=2)


@pytest.mark.parametrize("cores,setting,expected", [
    (16, -1, 15), (2, -1, 1), (1, -1, 0), (96, -1, pipeline.AUTO_WORKERS_MAX),
    (16, 0, 0), (16, 4, 4)])
def test_auto_workers_leave_a_core_for_the_training_loop(monkeypatch, cores, setting,
                                                          expected):
  monkeypatch.setattr(pipeline, "host_cores", lambda: cores)
  assert pipeline.worker_count(setting) == expected


def test_an_eval_pass_keeps_every_clip_in_order_whatever_the_workers(clips):
  ds = pipeline.build_dataset(clips, _data_config(num_workers=3), global_batch_size=5, seed=0,
                              process_index=0, process_count=1, num_epochs=1, train=False)
  batches = list(ds)
  assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 4]
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]),
                                np.arange(NUM_CLIPS))


def test_a_position_saved_over_other_data_is_refused(clips):
  stream = pipeline.DataStream(clips, _data_config(), global_batch_size=4, seed=1)
  next(stream)
  saved = json.loads(json.dumps(stream.get_state()))
  fewer = ListSource(clips[:-4])
  with pytest.raises(ValueError, match=rf"^data.manifest: .* saved over {len(clips)} clips, "
                                       rf"and the data now has {len(clips) - 4}"):
    pipeline.DataStream(fewer, _data_config(), global_batch_size=4, seed=1, saved=saved)
  del saved["num_clips"]  # a position saved before the count was kept still resumes
  pipeline.DataStream(clips, _data_config(), global_batch_size=4, seed=1, saved=saved)


def test_a_stream_resumes_with_the_worker_count_it_was_saved_with(clips, monkeypatch):
  cfg = _data_config(num_workers=-1)
  monkeypatch.setattr(pipeline, "host_cores", lambda: 3)  # 2 workers
  stream = pipeline.DataStream(clips, cfg, global_batch_size=4, seed=1)
  for _ in range(3):
    next(stream)
  saved = stream.get_state()
  expected = [next(stream)["index"] for _ in range(3)]
  monkeypatch.setattr(pipeline, "host_cores", lambda: 1)  # a machine with one core
  resumed = pipeline.DataStream(clips, cfg, global_batch_size=4, seed=1, saved=saved)
  assert resumed.workers == 2
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["index"], want)
  with pytest.raises(ValueError, match=r"^data.num_workers: .* saved with 2 grain workers"):
    pipeline.DataStream(clips, _data_config(num_workers=0), global_batch_size=4, seed=1,
                        saved=saved)
