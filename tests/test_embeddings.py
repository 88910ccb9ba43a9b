"""Embeddings API and CLI, the fast probe and the demo verdict, on a tiny pretrained workdir."""
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from bridle_jax import driver
from bridle_jax import prepare as prepare_lib
from bridle_jax import workdir as workdir_lib
from bridle_jax.data import demo
from bridle_jax.evaluate import embeddings
from bridle_jax.evaluate import fast_probe
from bridle_jax.evaluate import verdict
from configs import audio as audio_config

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return demo.write_demo_corpus(tmp_path_factory.mktemp("corpus"), clips_per_class=8,
                                eval_clips_per_class=2)


@pytest.fixture(scope="module")
def pretrained(corpus, tmp_path_factory):
  """A workdir with one short cold-start encoder phase on the small demo corpus."""
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  config = audio_config.get_config("demo")
  config.data.update(demo_dir="", manifest=corpus["train"], label_csv=corpus["label_csv"])
  config.rounds = ("encoder",)
  config.encoder_phase.steps = 10
  prepare_lib.prepare(config, workdir)
  driver.train(config, workdir)
  return workdir


def _manifest_with_missing_clip(corpus, tmp_path):
  with open(corpus["eval"]) as f:
    entries = json.load(f)["data"]
  base = os.path.dirname(corpus["eval"])
  entries = [dict(e, wav=os.path.join(base, e["wav"])) for e in entries]
  entries.insert(3, {"wav": str(tmp_path / "missing.wav"), "labels": entries[0]["labels"]})
  path = tmp_path / "manifest.json"
  path.write_text(json.dumps({"data": entries}))
  return str(path), entries


def _cli(*args):
  env = cpu_env.subprocess_env(1)
  return subprocess.run([sys.executable, "-m", "bridle_jax.evaluate.embeddings", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_embedding_cli_keeps_manifest_order_and_is_deterministic(pretrained, corpus, tmp_path):
  manifest, entries = _manifest_with_missing_clip(corpus, tmp_path)
  args = [f"--workdir={pretrained}", f"--manifest={manifest}",
          f"--label_csv={corpus['label_csv']}", "--patch", "--batch_size=8"]
  result = _cli(*args, f"--output={tmp_path / 'a.npz'}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report["clips"] == 21 and report["failed"] == 1
  assert "missing.wav" in result.stderr
  embeddings.main(args + [f"--output={tmp_path / 'b.npz'}"])  # same command, in-process
  a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
  assert a["pooled"].shape == (21, 64) and a["patch"].shape == (21, 64, 64)
  assert a["labels"].shape == (21, 10) and a["labels"].dtype == np.uint8
  assert list(a["paths"]) == [os.path.normpath(e["wav"]) for e in entries]
  classes = [line.split(",")[1] for line in open(corpus["label_csv"]).read().splitlines()[1:]]
  assert [classes[i] for i in a["labels"].argmax(1)] == [e["labels"] for e in entries]
  np.testing.assert_array_equal(a["failed"], [3])
  assert np.isnan(a["pooled"][3]).all() and np.isfinite(np.delete(a["pooled"], 3, 0)).all()
  for key in ("pooled", "patch", "labels", "paths", "failed"):
    np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_allclose(np.delete(a["pooled"], 3, 0),
                             np.delete(a["patch"], 3, 0).mean(1), rtol=1e-5, atol=1e-6)


def test_embedding_api_takes_files_and_waveforms_at_any_rate(pretrained, corpus):
  embedder = embeddings.Embedder.from_workdir(pretrained, batch_size=4)
  path = os.path.join(os.path.dirname(corpus["eval"]), "audio", "eval_impact_0000.wav")
  wave, rate = sf.read(path, dtype="float32")
  from_file = embedder.embed_files([path])
  from_wave = embedder.embed_waveforms([wave], sample_rate=rate)
  np.testing.assert_allclose(from_file["pooled"], from_wave["pooled"], rtol=1e-5, atol=1e-6)
  assert from_file["failed"].size == 0
  stereo_44k = np.stack([wave, wave], axis=1).repeat(2, axis=0)  # 32 kHz, two channels
  out = embedder.embed_waveforms([stereo_44k, wave[:4000]], sample_rate=32000)
  assert out["patch"].shape == (2, 64, 64) and out["pooled"].shape == (2, 64)
  assert np.isfinite(out["pooled"]).all()
  with pytest.raises(ValueError, match="waveform"):
    embedder.embed_waveforms([np.zeros((2, 3, 4))], sample_rate=16000)
  pooled_only = embedder.embed_source([{"path": path, "audio": b""}])
  assert set(pooled_only) == {"pooled", "failed"}  # patches stay on the device
  np.testing.assert_allclose(pooled_only["pooled"], from_file["pooled"], rtol=1e-5, atol=1e-6)


def test_fast_probe_separates_separable_classes():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 3
  classes = rng.integers(4, size=240)
  features = centers[classes] + rng.normal(size=(240, 16))
  labels = np.eye(4)[classes]
  for multi_label in (False, True):
    result = fast_probe.fit_and_evaluate(features[:160], labels[:160], features[160:],
                                         labels[160:], multi_label=multi_label, steps=100)
    assert result["accuracy"] > 0.9 and result["mAP"] > 0.9
  features[0] = np.nan  # a failed clip is left out rather than poisoning the fit
  result = fast_probe.fit_and_evaluate(features[:160], labels[:160], features[160:],
                                       labels[160:], multi_label=False, steps=100)
  assert result["accuracy"] > 0.9


def test_verdict_reports_both_probe_accuracies_and_codebook_usage(pretrained):
  config = workdir_lib.load_config(pretrained)
  result = verdict.run_verdict(config, pretrained, probe_steps=50)["verdict"]
  assert 0.0 <= result["pretrained_accuracy"] <= 1.0
  assert 0.0 <= result["random_init_accuracy"] <= 1.0
  assert (result["train_clips"], result["eval_clips"], result["phase"]) == (80, 20, "p1_encoder")
  usage = result["codebook_usage"]
  assert len(usage["fraction_used"]) == len(usage["perplexity"]) == 4
  assert all(0.0 < u <= 1.0 for u in usage["fraction_used"])
  assert all(1.0 <= p <= usage["codebook_size"] for p in usage["perplexity"])
  assert usage["cold_start_tokenizer"] is True
  assert "pretrained" in result["message"]
  json.dumps(result)  # ready for summary.json


def test_fast_probe_mode_of_the_main_cli(pretrained, corpus, tmp_path):
  eval_dir = os.path.dirname(corpus["eval"])
  entries = [dict(e, wav=os.path.join(eval_dir, e["wav"]))
             for e in json.loads(open(corpus["eval"]).read())["data"]]
  entries.append(dict(entries[0], wav=str(tmp_path / "gone.wav")))  # unreadable: skipped
  eval_manifest = tmp_path / "eval.json"
  eval_manifest.write_text(json.dumps({"data": entries}))
  env = cpu_env.subprocess_env(1)
  result = subprocess.run(
      [sys.executable, "-m", "bridle_jax.main", "--config=configs/finetune_audio.py:demo",
       f"--workdir={tmp_path}", "--mode=probe", "--config.finetune.fast_probe=True",
       "--config.finetune.fast_probe_steps=50", f"--config.init_from={pretrained}",
       "--config.model.width=128", "--config.data.demo_dir=",
       f"--config.data.manifest={corpus['train']}", f"--config.data.eval_manifest={eval_manifest}",
       f"--config.data.label_csv={corpus['label_csv']}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  run = summary["runs"]["fast_probe"]
  assert summary["mode"] == "fast_probe" and 0.0 <= run["final"]["accuracy"] <= 1.0
  assert (run["train_clips"], run["eval_clips"], run["skipped_clips"]) == (80, 20, 1)
  assert workdir_lib.load_config(str(tmp_path)).model.width == 64  # the pretrained width


def test_prepare_waveform_takes_time_major_input_and_refuses_channels_first():
  stereo = np.stack([np.full(800, 0.5), np.full(800, 0.1)], axis=1)  # (T, 2)
  np.testing.assert_allclose(embeddings.prepare_waveform(stereo, 16000, 16000), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match=r"\(channels, T\) array .* needs a transpose"):
    embeddings.prepare_waveform(stereo.T, 16000, 16000)
  with pytest.raises(ValueError, match="too few to resample from 44100 Hz"):
    embeddings.prepare_waveform(np.ones(1), 44100, 16000)


def test_prepare_waveform_scales_integer_pcm_as_a_file_decode_does(tmp_path):
  import soundfile as sf
  from bridle_jax.data import audio
  rng = np.random.default_rng(0)
  pcm = (rng.uniform(-0.5, 0.5, 1600) * 32767).astype(np.int16)
  path = str(tmp_path / "pcm16.wav")
  sf.write(path, pcm, 16000, subtype="PCM_16")
  decoded = audio.load_audio(path, 16000)
  np.testing.assert_allclose(embeddings.prepare_waveform(pcm, 16000, 16000), decoded, atol=1e-6)
  np.testing.assert_allclose(embeddings.prepare_waveform(pcm.astype(np.int32) << 16, 16000,
                                                         16000), decoded, atol=1e-6)
  unsigned = (pcm.astype(np.int32) // 256 + 128).astype(np.uint8)
  np.testing.assert_allclose(embeddings.prepare_waveform(unsigned, 16000, 16000), decoded,
                             atol=1 / 128)
  with pytest.raises(ValueError, match="NaN or infinite"):
    embeddings.prepare_waveform(np.array([0.1, np.nan, 0.2]), 16000, 16000)


def test_patch_export_streams_to_disk_instead_of_holding_copies(pretrained, corpus, tmp_path):
  """4,000 clips of patch embeddings (64 MB) are written with far less than that in memory,
  and the output directory keeps no scratch files."""
  with open(corpus["eval"]) as f:
    entries = json.load(f)["data"]
  base = os.path.dirname(corpus["eval"])
  entries = [dict(e, wav=os.path.join(base, e["wav"])) for e in entries] * 200
  manifest = tmp_path / "big.json"
  manifest.write_text(json.dumps({"data": entries}))
  out_dir = tmp_path / "out"
  tracemalloc.start()
  try:
    report = embeddings.embed_manifest(pretrained, str(manifest), str(out_dir / "emb.npz"),
                                       label_csv=corpus["label_csv"], include_patch=True)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  patch_bytes = 4000 * 64 * 64 * 4
  assert report["patch_shape"] == [4000, 64, 64]
  assert peak < patch_bytes / 2, f"peak {peak / 2**20:.1f} MiB for {patch_bytes / 2**20} MiB"
  assert os.listdir(out_dir) == ["emb.npz"]
  out = np.load(out_dir / "emb.npz")
  np.testing.assert_array_equal(out["patch"][:20], out["patch"][20:40])  # the same 20 clips
  np.testing.assert_allclose(out["pooled"], out["patch"].mean(1), rtol=1e-5, atol=1e-6)


def test_an_interrupted_npz_write_leaves_the_old_file_and_no_scratch(tmp_path, monkeypatch):
  path = tmp_path / "emb.npz"
  embeddings.write_npz(str(path), {"pooled": np.ones((3, 2), np.float32)})

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez", fail)
  with pytest.raises(OSError, match="disk full"):
    embeddings.write_npz(str(path), {"pooled": np.zeros((3, 2), np.float32)})
  assert os.listdir(tmp_path) == ["emb.npz"]
  np.testing.assert_array_equal(np.load(path)["pooled"], np.ones((3, 2)))
