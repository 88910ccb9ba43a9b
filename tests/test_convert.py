"""PyTorch export / import: official key sets, parity with the PyTorch reference, round trips.

The key lists in tests/data are official_impl.md Appendix A (pretraining BRIDLE, 644 keys)
and Appendix B (fine-tuning ViT, 152 keys) for audio ViT-B. Parity runs the demo-size model
(a random initialisation, and a "trained" one: perturbed params, k-means + EMA codebooks)
in float32 on both sides.
"""
import argparse
import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import prepare as prepare_lib
from bridle_jax import workdir as workdir_lib
from bridle_jax.convert import from_torch
from bridle_jax.convert import to_torch
from bridle_jax.data import demo as demo_data
from bridle_jax.evaluate import finetune
from bridle_jax.models import classifier as classifier_lib
from bridle_jax.models import quantizer
from bridle_jax.train import state as state_lib
from configs import audio
from configs import finetune_audio

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(__file__).resolve().parent / "data"
REL_TOL = 1e-5
TRAINED_PHASE = "p2_tokenizer"
DEMO_FRAMES = 256  # a 16 x 8 patch grid: time and frequency axes cannot be confused


def _demo_config():
  config = audio.get_config("demo")
  config.data.target_length = DEMO_FRAMES
  return config


def _official(name: str) -> dict[str, tuple[int, ...]]:
  """Ordered {key: shape} from a `key<TAB>shape` file."""
  rows = (line.split("\t") for line in (DATA / name).read_text().splitlines())
  return {key: ast.literal_eval(shape) for key, shape in rows}


def _torch_reference():
  """(torch, bridle_jax.convert.torch_reference), or skip the test without torch."""
  torch = pytest.importorskip("torch")
  return torch, importlib.import_module("bridle_jax.convert.torch_reference")


def _rel_err(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _run(module: str, *args: str, block_torch: bool = False) -> subprocess.CompletedProcess:
  """`python -m module args` from the repo root; `block_torch` makes `import torch` fail."""
  code = ("import runpy, sys\n"
          + ("sys.modules['torch'] = None\n" if block_torch else "")
          + f"sys.argv = {[module, *args]!r}\n"
          + f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y)


# ---------------------------------------------------------------- audio ViT-B key sets

@pytest.fixture(scope="module")
def vitb():
  """The audio ViT-B config and an all-zero {'params', 'codebooks'} of its shapes (zero
  strides: no ViT-B memory or compute)."""
  config = audio.get_config()
  abstract = nn.unbox(workdir_lib.abstract_pretrained(state_lib.build_models(config)))
  zeros = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)
  return config, zeros


def test_vitb_export_has_the_official_keys_shapes_and_dtypes(vitb):
  config, tree = vitb
  for exported, name in ((to_torch.pretrain_state_dict(config, tree),
                          "official_state_dict_keys.txt"),
                         (to_torch.finetune_state_dict(config, tree["params"]),
                          "official_finetune_keys.txt")):
    official = _official(name)
    assert list(exported) == list(official)  # same keys, same order
    assert {k: v.shape for k, v in exported.items()} == official
    assert {v.dtype for v in exported.values()} == {np.dtype(np.float32)}
  assert len(_official("official_state_dict_keys.txt")) == 644
  assert len(_official("official_finetune_keys.txt")) == 152


def test_torch_reference_vitb_has_the_official_keys_and_loads_exports_strictly(vitb):
  torch, torch_reference = _torch_reference()
  config, tree = vitb
  with torch.device("meta"):
    models = {"official_state_dict_keys.txt": torch_reference.pretrain_model(config),
              "official_finetune_keys.txt": torch_reference.finetune_model(config)}
  exports = {"official_state_dict_keys.txt": to_torch.pretrain_state_dict(config, tree),
             "official_finetune_keys.txt": to_torch.finetune_state_dict(config, tree["params"])}
  # The frozen tables follow the official formula, computed independently in torch.
  pretrain = exports["official_state_dict_keys.txt"]
  for key, width, cls in (("encoder_decoder.pos_embed", 768, True),
                          ("encoder_decoder.decoder_pos_embed", 512, True),
                          ("tokenizer.pos_embed", 768, True),
                          ("tokenizer.estimator_pos_embed", 768, False)):
    np.testing.assert_allclose(pretrain[key], torch_reference.audio_pos_embed(64, 8, width, cls),
                               rtol=0, atol=1e-6, err_msg=key)
  for name, model in models.items():
    official = _official(name)
    state = model.state_dict()
    assert list(state) == list(official)
    assert {k: tuple(v.shape) for k, v in state.items()} == official
    result = model.load_state_dict(
        {k: torch.empty(v.shape, device="meta") for k, v in exports[name].items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_global_decoder_layout_loads_strictly_and_round_trips():
  """Decoder mode 0: timm blocks under decoder_blocks.<i>, the encoder blocks' layout."""
  torch, torch_reference = _torch_reference()
  config = _demo_config()
  config.model.decoder.mode = 0
  abstract = nn.unbox(workdir_lib.abstract_pretrained(state_lib.build_models(config)))
  rng = np.random.default_rng(0)
  tree = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)
  exported = to_torch.pretrain_state_dict(config, tree)
  assert "encoder_decoder.decoder_blocks.1.mlp.fc2.weight" in exported
  model = torch_reference.pretrain_model(config)
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                                 strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  _assert_trees_equal(tree, from_torch.from_state_dict(exported, config))


# ---------------------------------------------------------------- demo-size model

@pytest.fixture(scope="module")
def demo():
  config = _demo_config()
  return config, state_lib.build_models(config)


@pytest.fixture(scope="module")
def inputs(demo):
  config, _ = demo
  shape = (2, config.data.target_length, config.data.num_mel_bins)
  return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def forward(demo):
  """Jitted JAX forward of everything the parity test compares."""
  _, models = demo

  @jax.jit
  def run(params, codebooks, x):
    features, _, ids_restore = models.encoder.apply({"params": params["encoder"]}, x)
    out = {"features": features,
           "logits": models.decoder.apply({"params": params["decoder"]}, features, ids_restore)}
    for path, cold_start in (("full", False), ("cold", True)):
      z = models.tokenizer.apply({"params": params["tokenizer"]}, x, cold_start=cold_start)
      z_q, codes, _, _ = quantizer.quantize(models.quantizer, codebooks, z)
      out[f"z_{path}"], out[f"codes_{path}"] = z, codes
      out[f"estimator_{path}"] = models.estimator.apply({"params": params["estimator"]}, z_q)
    return out

  return lambda tree, x: jax.tree.map(np.asarray, run(tree["params"], tree["codebooks"], x))


@pytest.fixture(scope="module")
def random_tree(demo):
  """A fresh initialisation (the models' own initialisers; k-means still pending)."""
  _, models = demo
  init = jax.jit(lambda rng: state_lib.init_params(models, rng))
  params = nn.unbox(init(jax.random.key(0, impl="unsafe_rbg")))  # fast to compile on CPU
  return {"params": jax.tree.map(np.asarray, params),
          "codebooks": quantizer.init(models.quantizer, jax.random.PRNGKey(1))}


@pytest.fixture(scope="module")
def trained_workdir(demo, random_tree, forward, tmp_path_factory):
  """A finished-phase workdir holding a non-fresh state: every parameter perturbed (LayerNorm
  scales and Swin taus off 1, biases off 0), codebooks k-means-initialised on tokenizer
  outputs, then three EMA steps."""
  config, models = demo
  spec = models.quantizer
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda a: (a * (1 + 0.2 * rng.standard_normal(a.shape))
                 + 0.05 * rng.standard_normal(a.shape)).astype(np.float32),
      random_tree["params"])
  tree = {"params": params, "codebooks": random_tree["codebooks"]}
  batches = [rng.standard_normal((2, config.data.target_length, config.data.num_mel_bins))
             .astype(np.float32) for _ in range(4)]
  latents = [forward(tree, x)["z_full"] for x in batches]
  codebooks = quantizer.kmeans_init(spec, tree["codebooks"], latents[0], jax.random.PRNGKey(2))
  ema_step = jax.jit(lambda c, z: quantizer.ema_update(spec, c, quantizer.quantize(spec, c, z)[3]))
  for z in latents[1:]:
    codebooks = ema_step(codebooks, z)
  workdir = tmp_path_factory.mktemp("trained")
  from_torch.write_workdir(str(workdir), config, {"params": params, "codebooks": codebooks},
                           TRAINED_PHASE, source="test")
  return workdir


@pytest.fixture(scope="module")
def exported(trained_workdir, tmp_path_factory):
  """The to_torch command run on the trained workdir: {'pth', 'finetune_pth', ...} paths."""
  pytest.importorskip("torch")
  output = tmp_path_factory.mktemp("export") / "bridle.pth"
  result = _run("bridle_jax.convert.to_torch", f"--workdir={trained_workdir}",
                f"--output={output}")
  assert result.returncode == 0, result.stderr
  root = str(output)[:-len(".pth")]
  paths = {"pth": str(output), "safetensors": root + ".safetensors",
           "finetune_pth": root + "_finetune.pth",
           "finetune_safetensors": root + "_finetune.safetensors"}
  assert all(os.path.exists(p) for p in paths.values()), result.stdout
  return paths


def _torch_state(torch, path: str) -> dict:
  return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.parametrize("which", ["random_init", "trained"])
def test_parity_with_the_torch_reference(which, demo, inputs, forward, random_tree,
                                         trained_workdir, request):
  torch, torch_reference = _torch_reference()
  config, _ = demo
  if which == "random_init":
    tree = random_tree
    state = {k: torch.from_numpy(np.array(v))
             for k, v in to_torch.pretrain_state_dict(config, tree).items()}
  else:
    _, _, tree = workdir_lib.load_pretrained(str(trained_workdir))
    state = _torch_state(torch, request.getfixturevalue("exported")["pth"])
  model = torch_reference.pretrain_model(config).eval()
  result = model.load_state_dict(state, strict=True)
  assert not result.missing_keys and not result.unexpected_keys

  ours = forward(tree, inputs)
  x = torch.from_numpy(inputs)[:, None]
  with torch.no_grad():
    theirs = {"features": model.encoder_decoder.forward_encoder_no_mask(x),
              "logits": model.encoder_decoder(x, mask_ratio=0.0)[0]}
    for path, cold_start in (("full", False), ("cold", True)):
      z = model.tokenizer.encode(x, cold_start)
      z_q, codes = model.tokenizer.quantizer(z)
      theirs[f"z_{path}"], theirs[f"codes_{path}"] = z, codes
      theirs[f"estimator_{path}"] = model.tokenizer.forward_estimator(z_q)
  theirs = {k: v.numpy() for k, v in theirs.items()}

  errors = {}
  for name, value in ours.items():
    assert value.shape == theirs[name].shape, name
    if name.startswith("codes"):
      np.testing.assert_array_equal(value, theirs[name], err_msg=name)
    else:
      errors[name] = _rel_err(value, theirs[name])
  print(which, {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) <= REL_TOL, errors


def test_finetune_export_parity_and_head_init(demo, inputs, trained_workdir, exported):
  torch, torch_reference = _torch_reference()
  config, models = demo
  state = _torch_state(torch, exported["finetune_pth"])
  np.testing.assert_array_equal(state["fc_norm.weight"].numpy(), 1.0)
  np.testing.assert_array_equal(state["fc_norm.bias"].numpy(), 0.0)
  np.testing.assert_array_equal(state["head.bias"].numpy(), 0.0)
  head = state["head.weight"].numpy()
  assert head.shape == (527, config.model.width)
  assert 1.5e-5 < head.std() < 2.5e-5 and abs(head.mean()) < 1e-6

  model = torch_reference.finetune_model(config).eval()
  result = model.load_state_dict(state, strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  with torch.no_grad():
    x = torch.from_numpy(inputs)[:, None]
    theirs_features = model.forward_features(x).numpy()
    theirs_logits = model(x).numpy()

  def pooled_block_output(encoder, x):  # the fine-tuning ViT's trunk: no final norm
    tokens = encoder.embed(x)
    cls = jnp.broadcast_to(encoder.cls_token, (tokens.shape[0], 1, tokens.shape[-1]))
    h = jnp.concatenate([cls, tokens], axis=1)
    for block in encoder.blocks:
      h = block(h)
    return h[:, 1:].mean(axis=1)

  _, _, tree = workdir_lib.load_pretrained(str(trained_workdir))
  pooled = np.asarray(models.encoder.apply({"params": tree["params"]["encoder"]}, inputs,
                                           method=pooled_block_output), np.float64)
  mean, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
  features = (pooled - mean) / np.sqrt(var + 1e-6)  # fc_norm: weight 1, bias 0, eps 1e-6
  logits = features @ head.T.astype(np.float64)
  assert _rel_err(features, theirs_features) <= REL_TOL
  assert _rel_err(logits, theirs_logits) <= REL_TOL


def test_the_pretraining_export_is_what_the_official_finetune_flag_loads(demo, exported):
  """Official main_finetune.py --finetune (official_impl.md §6.2): keep the keys holding
  "encoder_decoder", strip that prefix once, load with strict=False. Every backbone tensor
  must arrive; only the new fc_norm and head may stay missing."""
  torch, torch_reference = _torch_reference()
  config, _ = demo
  checkpoint = _torch_state(torch, exported["pth"])
  kept = {k.replace("encoder_decoder.", "", 1): v for k, v in checkpoint.items()
          if "encoder_decoder" in k}
  model = torch_reference.finetune_model(config)
  result = model.load_state_dict(kept, strict=False)
  assert sorted(result.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias",
                                         "head.weight"]
  finetune_state = _torch_state(torch, exported["finetune_pth"])
  loaded = model.state_dict()
  for key, value in finetune_state.items():
    if not key.startswith(("fc_norm.", "head.")):
      np.testing.assert_array_equal(loaded[key].numpy(), value.numpy(), err_msg=key)


def test_from_torch_reads_a_checkpoint_saved_by_the_official_launchers(demo, exported,
                                                                       tmp_path):
  """The official scripts save {'model', 'optimizer', 'epoch', 'scaler', 'args'}; under
  submitit 'args' holds pathlib paths. Anything else is refused with the file named."""
  torch, _ = _torch_reference()
  config, _ = demo
  state = _torch_state(torch, exported["pth"])
  args = argparse.Namespace(output_dir=pathlib.PosixPath("/runs/pt"), model="vit_b",
                            log_dir=pathlib.PosixPath("/runs/pt"), input_size=(1024, 128))
  official = tmp_path / "checkpoint-140.pth"
  torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 140,
              "scaler": {"scale": 65536.0}, "args": args}, official)
  read = from_torch.read_state_dict(str(official))
  assert list(read) == list(state)
  _assert_trees_equal(from_torch.from_state_dict(read, config),
                      from_torch.from_state_dict(from_torch.read_state_dict(exported["pth"]),
                                                 config))

  unsafe = tmp_path / "pickled_object.pth"
  torch.save({"model": state, "args": subprocess.CompletedProcess([], 0)}, unsafe)
  with pytest.raises(ValueError, match=r"pickled_object\.pth: a weights-only load refuses it"):
    from_torch.read_state_dict(str(unsafe))


@pytest.mark.parametrize("which", ["random_init", "trained"])
def test_round_trip_ours_to_official_to_ours_is_bitwise(which, demo, random_tree,
                                                        trained_workdir):
  config, _ = demo
  if which == "random_init":
    tree = random_tree
  else:
    _, _, tree = workdir_lib.load_pretrained(str(trained_workdir))
    tree = jax.tree.map(np.asarray, tree)
  back = from_torch.from_state_dict(to_torch.pretrain_state_dict(config, tree), config)
  _assert_trees_equal(tree, back)


def test_export_codebook_buffers(demo, trained_workdir, exported):
  """Padding row zero, cluster_size_ema / embed_ema from our state, initted 1."""
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  config, _ = demo
  _, _, tree = workdir_lib.load_pretrained(str(trained_workdir))
  codebooks = tree["codebooks"]
  state = safetensors_numpy.load_file(exported["safetensors"])
  for s in range(config.model.quantizer.num_codebooks):
    prefix = f"tokenizer.quantizer.codebooks.{s}."
    np.testing.assert_array_equal(state[prefix + "weight"][:-1], codebooks.codebooks[s])
    np.testing.assert_array_equal(state[prefix + "weight"][-1], 0.0)
    np.testing.assert_array_equal(state[prefix + "embed_ema"], codebooks.codebooks[s])
    np.testing.assert_array_equal(state[prefix + "cluster_size_ema"], codebooks.cluster_size[s])
    np.testing.assert_array_equal(state[prefix + "initted"], [1.0])
  assert float(np.asarray(codebooks.cluster_size).sum()) > 0


def test_safetensors_hold_the_same_tensors(exported):
  torch = pytest.importorskip("torch")
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  for pth, safetensors in (("pth", "safetensors"), ("finetune_pth", "finetune_safetensors")):
    state = _torch_state(torch, exported[pth])
    loaded = safetensors_numpy.load_file(exported[safetensors])
    assert set(loaded) == set(state)
    for key, value in state.items():
      assert loaded[key].dtype == np.float32
      np.testing.assert_array_equal(loaded[key], value.numpy(), err_msg=key)


def test_from_torch_writes_a_workdir_that_load_pretrained_and_init_from_read(
    demo, trained_workdir, exported, tmp_path):
  config, _ = demo
  _, _, original = workdir_lib.load_pretrained(str(trained_workdir))

  imported = tmp_path / "from_pth"
  assert from_torch.import_checkpoint(exported["pth"], str(imported), config) == "p1_tokenizer"
  # The command reads .safetensors without torch.
  from_safetensors = tmp_path / "from_safetensors"
  result = _run("bridle_jax.convert.from_torch", f"--checkpoint={exported['safetensors']}",
                f"--workdir={from_safetensors}", "--config=configs/audio.py:demo",
                f"--config.data.target_length={DEMO_FRAMES}",
                "--phase_kind=encoder", block_torch=True)
  assert result.returncode == 0, result.stderr

  for workdir, phase in ((imported, "p1_tokenizer"), (from_safetensors, "p1_encoder")):
    assert workdir_lib.finished_phases(str(workdir)) == [phase]
    loaded_config, _, tree = workdir_lib.load_pretrained(str(workdir))
    # init_from requires the same `model` config (as saved JSON) as the run continuing it.
    assert (json.loads(loaded_config.model.to_json_best_effort())
            == json.loads(config.model.to_json_best_effort()))
    _assert_trees_equal(jax.tree.map(np.asarray, original), jax.tree.map(np.asarray, tree))

  with pytest.raises(ValueError, match="already holds a run"):
    from_torch.import_checkpoint(exported["pth"], str(imported), config)


def test_from_torch_names_the_key_on_a_config_mismatch(demo, exported):
  config, _ = demo
  state = from_torch.read_state_dict(exported["safetensors"])
  smaller = _demo_config()
  smaller.model.quantizer.codebook_size = 16
  with pytest.raises(ValueError, match=r"encoder_decoder\.decoder_pred\.weight: shape "
                                       r"\(128, 64\) in the checkpoint, \(64, 64\) expected"):
    from_torch.from_state_dict(state, smaller)
  del state["tokenizer.norm.bias"]
  with pytest.raises(ValueError, match=r"missing \['tokenizer\.norm\.bias'\]"):
    from_torch.from_state_dict(state, config)


def test_a_fine_tuned_classifier_exports_with_its_trained_head(trained_workdir, tmp_path):
  """Fine-tuned from the trained workdir on shorter clips (its pos rows come from the
  pretraining table), the classifier loads strictly into the reference fine-tuning ViT and
  gives the same logits."""
  torch, torch_reference = _torch_reference()
  corpus = demo_data.write_demo_corpus(tmp_path / "corpus", clips_per_class=2,
                                       eval_clips_per_class=1)
  config = finetune_audio.get_config("demo")
  config.data.update(demo_dir="", manifest=corpus["train"], label_csv=corpus["label_csv"],
                     eval_manifest=corpus["eval"])
  config.init_from = str(trained_workdir)
  config.finetune.steps = 2
  workdir = tmp_path / "finetuned"
  prepare_lib.prepare(config, str(workdir))
  finetune.run(config, str(workdir), "finetune")

  output = tmp_path / "classifier.pth"
  result = _run("bridle_jax.convert.to_torch", f"--workdir={workdir}", f"--output={output}")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report["run"] == "finetune" and report["classifier"]["num_classes"] == 10
  state = _torch_state(torch, str(output))
  saved = workdir_lib.load_config(str(workdir))
  model = torch_reference.finetune_model(saved, num_classes=10).eval()
  loaded = model.load_state_dict(state, strict=True)
  assert not loaded.missing_keys and not loaded.unexpected_keys

  params = workdir_lib.restore_final(
      str(workdir / "checkpoints" / "finetune_final"))["params"]
  np.testing.assert_array_equal(state["head.weight"].numpy(),
                                np.asarray(params["head"]["kernel"]).T)
  assert np.abs(state["head.weight"].numpy()).mean() > 1e-3  # trained, not the 2e-5 init
  x = np.random.default_rng(0).standard_normal(
      (2, saved.data.target_length, saved.data.num_mel_bins)).astype(np.float32)
  classifier = classifier_lib.classifier_from_config(
      saved.model, saved.finetune, classifier_lib.input_grid(saved.model, saved.data), 10)
  ours = np.asarray(classifier.apply({"params": params}, x, train=False))
  with torch.no_grad():
    theirs = model(torch.from_numpy(x)[:, None]).numpy()
  assert _rel_err(ours, theirs) <= REL_TOL

  for args, message in ((["--run=fold1"], "run 'fold1' is not a finished run"),
                        (["--phase=p1_encoder"], "it has runs, not phases")):
    refused = _run("bridle_jax.convert.to_torch", f"--workdir={workdir}",
                   f"--output={tmp_path / 'x.pth'}", *args)
    assert refused.returncode == 2 and message in refused.stderr.splitlines()[-1]
  same = _run("bridle_jax.convert.to_torch", f"--workdir={trained_workdir}",
              f"--output={tmp_path / 'b.pth'}", f"--finetune_output={tmp_path / 'b.pth'}")
  assert same.returncode == 2 and "name two files" in same.stderr.splitlines()[-1]
  assert not (tmp_path / "b.pth").exists()


def test_commands_without_torch_print_the_install_hint(tmp_path):
  result = _run("bridle_jax.convert.to_torch", f"--workdir={tmp_path}",
                f"--output={tmp_path / 'x.pth'}", block_torch=True)
  assert result.returncode == 1
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: ") and "pip install 'bridle_jax[torch]'" in last_line
  assert not os.path.exists(tmp_path / "x.pth")
