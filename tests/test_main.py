"""The command line: config validation and `--mode=data` on the demo corpus."""
import json
import os
import subprocess
import sys

import pytest

from bridle_jax import config_validation
from configs import audio as audio_config

import cpu_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, devices=1):
  env = cpu_env.subprocess_env(devices)
  return subprocess.run([sys.executable, "-m", "bridle_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("variant", ["", "demo"])
def test_shipped_configs_are_valid(variant):
  config = audio_config.get_config(variant)
  if not variant:
    config.data.manifest, config.data.label_csv = "train.json", "labels.csv"
  config_validation.validate_config(config)


def test_every_shipped_config_loads_by_path_from_any_directory(tmp_path):
  """configs/*.py build on each other; given by absolute path from another directory
  (where `configs` is not importable) each still loads, as --config loads it."""
  script = ("import sys\n"
            "from absl import flags\n"
            "from ml_collections import config_flags\n"
            "config = config_flags.DEFINE_config_file('config')\n"
            "flags.FLAGS(['x', '--config=' + sys.argv[1]])\n"
            "print(config.value.get('mode', 'train'))\n")
  for name, variant, mode in (("audio", "", "train"), ("image", "demo", "train"),
                              ("finetune_audio", "esc50", "finetune"),
                              ("finetune_image", "in1k_probe", "probe")):
    path = os.path.join(REPO, "configs", f"{name}.py") + (f":{variant}" if variant else "")
    result = subprocess.run([sys.executable, "-c", script, path], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ""}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == mode, name


def test_default_config_is_the_paper_recipe():
  c = audio_config.get_config()
  assert (c.data.target_length, c.data.num_mel_bins, c.model.patch_size) == (1024, 128, 16)
  assert (c.model.width, c.model.depth, c.model.num_heads) == (768, 12, 12)
  assert c.model.mask_ratio == 0.8
  q = c.model.quantizer
  assert (q.type, q.num_codebooks, q.codebook_size, q.code_dim, q.decay, q.kmeans_init) == (
      "rq", 4, 256, 256, 0.99, True)
  assert (c.encoder_phase.epochs, c.encoder_phase.warmup_epochs, c.encoder_phase.lr) == (
      140, 10, 5e-4)
  assert (c.tokenizer_phase.epochs, c.tokenizer_phase.warmup_epochs, c.tokenizer_phase.lr) == (
      31, 2, 2e-4)
  assert c.encoder_phase.batch_size == c.tokenizer_phase.batch_size == 1024


@pytest.mark.parametrize("field,value,expected", [
    ("data.target_length", 1000, "data.target_length: 1000 frames is not divisible"),
    ("data.format", "csv", "data.format: 'csv' is not one of"),
    ("model.quantizer.type", "lfq", "model.quantizer.type: 'lfq' is not one of"),
    ("model.mask_ratio", 1.0, "model.mask_ratio: must lie in [0, 1)"),
    ("model.decoder.window", (5, 4), "model.decoder.window: (5, 4) does not tile"),
    ("data.mixup", 1.5, "data.mixup: is a probability"),
    ("data.num_workers", -2, "data.num_workers: must be >= 0, or -1 for one per CPU core"),
    ("data.max_clip_seconds", 1.28, "data.max_clip_seconds: 1.28 s is shorter than the 128"),
    ("rounds", ("encoder", "tokeniser"), "rounds[1]: 'tokeniser' is not one of"),
    ("model.size", "L", "model.size: 'L' is width, depth, heads (1024, 24, 16), but "
     "model.width, model.depth, model.num_heads are (64, 2, 4)"),
    ("sharding_rules", (("embed", "fsdq"),), "sharding_rules: ('embed', 'fsdq') names 'fsdq', "
     "not one of the mesh axes"),
    ("sharding_rules", (("mlp", ("model", "tp")),), "sharding_rules: ('mlp', ('model', 'tp')) "
     "names 'tp'"),
    ("sharding_rules", (("embed",),), "sharding_rules: ('embed',) is not a (logical axis, "
     "mesh axes) pair"),
])
def test_invalid_fields_are_named(field, value, expected):
  config = audio_config.get_config("demo")
  node = config
  *parents, leaf = field.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate_config(config)
  assert str(error.value).startswith(expected)


def test_unknown_config_variant_is_refused():
  with pytest.raises(ValueError, match="unknown variant 'tiny'"):
    audio_config.get_config("tiny")


def test_data_mode_on_demo_corpus_over_eight_devices(tmp_path):
  result = _run("--config=configs/audio.py:demo", f"--workdir={tmp_path}", "--mode=data",
                "--data_batches=3", devices=8)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  assert report["clips"] == 400 and report["classes"] == 10
  assert report["min_clips_per_class"] == report["max_clips_per_class"] == 40
  assert report["devices"] == 8
  assert report["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
  assert report["waveform_batch"] == [16, 20720]
  assert report["feature_batch"] == [16, 128, 128]
  assert report["skipped_clips"] == 0
  assert report["clips_per_second"] > 0
  assert os.path.exists(tmp_path / "demo_data" / "train.json")


def test_data_mode_reports_skipped_clips(tmp_path):
  (tmp_path / "ok.wav").write_bytes(b"")
  labels = tmp_path / "labels.csv"
  labels.write_text("index,mid,display_name\n0,/m/a,A\n")
  import numpy as np
  import soundfile as sf
  entries = []
  for i in range(8):
    sf.write(tmp_path / f"c{i}.wav", np.random.default_rng(i).normal(size=16000) * 0.1, 16000)
    entries.append({"wav": f"c{i}.wav", "labels": "/m/a"})
  entries.append({"wav": "ok.wav", "labels": "/m/a"})
  entries.append({"wav": "gone.wav", "labels": "/m/a"})
  manifest = tmp_path / "train.json"
  manifest.write_text(json.dumps({"data": entries}))
  result = _run("--config=configs/audio.py:demo", f"--workdir={tmp_path / 'w'}", "--mode=data",
                "--data_batches=6", "--config.data.demo_dir=", f"--config.data.manifest={manifest}",
                f"--config.data.label_csv={labels}", "--config.encoder_phase.batch_size=4")
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout)
  assert report["skipped_clips"] >= 2
  assert "gone.wav" in result.stderr


@pytest.mark.parametrize("override,expected", [
    ("--config.data.target_length=1000", "error: data.target_length: 1000 frames"),
    ("--config.data.manifest=/nonexistent/train.json", "error: data.manifest: file not found"),
    ("--config.mesh.data=2", "error: mesh: data x fsdp x model = 2x1x1 does not match"),
])
def test_bad_input_exits_with_one_line(tmp_path, override, expected):
  result = _run("--config=configs/audio.py:demo", f"--workdir={tmp_path}", "--mode=data", override)
  assert result.returncode == 2
  assert expected in result.stderr
  assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1


def test_data_report_of_a_finetune_config_uses_the_finetune_batch(tmp_path):
  from bridle_jax.data import demo
  from bridle_jax.data import report
  from configs import finetune_audio
  corpus = demo.write_demo_corpus(tmp_path, clips_per_class=2, eval_clips_per_class=1)
  config = finetune_audio.get_config("demo")
  config.data.update(demo_dir="", manifest=corpus["train"], label_csv=corpus["label_csv"])
  config.finetune.batch_size = 8  # the config's pretraining phases keep batch 1024
  result = report.run_data_report(config, num_batches=2)
  assert result["waveform_batch"][0] == 8


def test_a_batch_that_does_not_split_over_the_batch_shards_names_the_field():
  import jax
  from bridle_jax.train import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1}, jax.devices()[:8])
  assert sharding.batch_shards(mesh) == 8
  sharding.check_batch_divides("encoder_phase.batch_size", 16, mesh)
  with pytest.raises(ValueError, match=r"^encoder_phase.batch_size=12 is not divisible by the "
                                       r"8 data-parallel devices \(mesh.data x mesh.fsdp\)"):
    sharding.check_batch_divides("encoder_phase.batch_size", 12, mesh)


def test_init_from_is_saved_as_an_absolute_path(tmp_path, monkeypatch):
  from bridle_jax import prepare
  monkeypatch.chdir(tmp_path)
  config = audio_config.get_config("demo")
  config.data.demo_dir = ""
  config.init_from = "runs/pretrain"
  prepare.prepare(config, "")
  assert config.init_from == str(tmp_path / "runs" / "pretrain")


def test_a_model_axis_across_hosts_is_refused_naming_mesh_model():
  import numpy as np
  from bridle_jax.train import sharding
  # 2 hosts x 4 devices, as a (data, fsdp, model) mesh.
  hosts = np.repeat(np.arange(2), 4)
  sharding.check_hosts_own_their_batch_shards(hosts.reshape(2, 1, 4))  # model within hosts
  sharding.check_hosts_own_their_batch_shards(hosts.reshape(4, 1, 2))
  with pytest.raises(ValueError, match=r"^mesh.model=8 spans hosts .*hosts \[0, 1\].*"
                                       r"mesh.model <= 4"):
    sharding.check_hosts_own_their_batch_shards(hosts.reshape(1, 1, 8))
