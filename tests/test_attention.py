"""Attention backends (choice, cuDNN padding), window attention and rematerialisation."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax import config_validation
from bridle_jax.data import audio
from bridle_jax.models import (attention, classifier, decoder, layers, quantizer, vit,
                               window_attention_kernel)
from bridle_jax.train import optim, steps
from bridle_jax.train import state as state_lib
from configs import audio as audio_config


def _qkv(rng, batch=2, length=103, heads=4, head_dim=8):
  keys = jax.random.split(jax.random.key(rng), 3)
  return [jax.random.normal(k, (batch, length, heads, head_dim)) for k in keys]


def test_auto_resolves_to_xla_off_gpu_and_bad_names_raise():
  assert jax.default_backend() == "cpu"
  assert attention.resolve("auto", jnp.bfloat16, 64) == "xla"
  assert attention.resolve("cudnn", jnp.float32, 64) == "cudnn"
  with pytest.raises(ValueError, match="'flash'"):
    attention.resolve("flash", jnp.float32, 64)


@pytest.mark.parametrize("dtype, head_dim, expected", [
    (jnp.bfloat16, 64, "cudnn"), (jnp.float16, 128, "cudnn"), (jnp.float32, 64, "xla"),
    (jnp.bfloat16, 36, "xla"), (jnp.bfloat16, 256, "xla")])
def test_auto_on_a_gpu_takes_cudnn_only_where_it_accepts_the_call(monkeypatch, dtype, head_dim,
                                                                   expected):
  monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
  assert attention.resolve("auto", dtype, head_dim) == expected


@pytest.mark.parametrize("backend, dtype, window_tokens, head_dim, expected", [
    ("gpu", jnp.bfloat16, 16, 32, "pallas"), ("gpu", jnp.float16, 64, 16, "pallas"),
    ("gpu", jnp.float32, 16, 32, "xla"), ("gpu", jnp.bfloat16, 4, 32, "xla"),
    ("gpu", jnp.bfloat16, 16, 24, "xla"), ("cpu", jnp.bfloat16, 16, 32, "xla"),
    ("tpu", jnp.bfloat16, 16, 32, "xla")])
def test_auto_window_attention_takes_the_kernel_on_a_gpu_where_it_applies(
    monkeypatch, backend, dtype, window_tokens, head_dim, expected):
  monkeypatch.setattr(decoder.jax, "default_backend", lambda: backend)
  assert decoder.resolve_window_impl("auto", dtype, window_tokens, head_dim) == expected
  assert decoder.resolve_window_impl("xla", dtype, window_tokens, head_dim) == "xla"


@pytest.fixture
def cudnn_calls(monkeypatch):
  """The (q shape, keyword arguments) of every cuDNN attention call, each run with XLA on
  this CPU instead."""
  calls = []
  plain = jax.nn.dot_product_attention

  def recording(q, k, v, **kwargs):
    if kwargs.get("implementation") == "cudnn":
      calls.append((q.shape, dict(kwargs)))
    return plain(q, k, v, **{**kwargs, "implementation": "xla"})

  monkeypatch.setattr(attention.jax.nn, "dot_product_attention", recording)
  return calls


@pytest.mark.parametrize("with_bias", [False, True])
def test_cudnn_padding_leaves_the_result_unchanged(cudnn_calls, with_bias):
  """The cuDNN route pads 103 tokens to 104; the padded key must get no weight."""
  q, k, v = _qkv(0)
  bias = jax.random.normal(jax.random.key(5), (1, 4, 103, 103)) if with_bias else None
  expected = attention.attend(q, k, v, "xla", bias=bias)
  out = attention.attend(q, k, v, "cudnn", bias=bias)

  (shape, kwargs), = cudnn_calls
  assert shape == (2, 104, 4, 8)
  np.testing.assert_array_equal(kwargs["key_value_seq_lengths"], [103, 103])
  assert out.shape == q.shape
  np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("module, method, shape", [
    (vit.ViTBackbone(grid=(4, 4), width=32, depth=2, num_heads=2, patch_size=4), "transform",
     (2, 16, 32)),
    (classifier.Classifier(grid=(4, 4), width=32, depth=2, num_heads=2, patch_size=4,
                           num_classes=3), "pooled", (2, 16, 16)),
], ids=["encoder-tokenizer", "classifier"])
def test_vits_pad_their_tokens_once_for_cudnn(cudnn_calls, module, method, shape):
  """CLS + 16 patches = 17 tokens run on cuDNN's even length: padded to 18 once before the
  blocks (one pad, not one per block and tensor), the padding masked as keys, the same
  outputs and gradients as plain attention on 17 tokens."""
  x = jax.random.normal(jax.random.key(0), shape)
  params = module.init(jax.random.key(2), x, method=method)
  out = jax.eval_shape(lambda: module.apply(params, x, method=method))
  cotangent = jax.random.normal(jax.random.key(1), out.shape)

  def value_and_grads(impl):
    clone = module.clone(attention_impl=impl)
    loss = lambda p, x: jnp.sum(clone.apply(p, x, method=method) * cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  expected = value_and_grads("xla")
  got = value_and_grads("cudnn")
  assert [(q_shape[1], kwargs.get("query_seq_lengths"))
          for q_shape, kwargs in cudnn_calls] == [(18, None)] * 2
  for _, kwargs in cudnn_calls:
    np.testing.assert_array_equal(kwargs["key_value_seq_lengths"], [17, 17])
  clone = module.clone(attention_impl="cudnn")
  jaxpr = str(jax.make_jaxpr(lambda x: clone.apply(params, x, method=method))(x))
  assert jaxpr.count(" pad[") == 1
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_vit_attention_projects_q_k_v_with_one_matmul_each():
  """cuDNN takes q, k and v as separate operands: each comes straight out of its own
  matmul, not as a slice of one fused (B, N, 3, heads, head_dim) output (which XLA copies
  before a custom call), from the same (width, 3, heads, head_dim) kernel. Only q gets a
  bias added (the k and v biases are folded away: test_vit), to the matmul's flat output
  (the form XLA:GPU folds into the cuBLAS call), before the split into heads."""
  module = layers.Attention(num_heads=2)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  params = module.init(jax.random.key(1), x)
  jaxpr = str(jax.make_jaxpr(lambda x: module.apply(params, x))(x))
  matmuls = [line for line in jaxpr.splitlines() if "f32[2,5,8] = dot_general" in line]
  assert len(matmuls) == 4  # q, k, v and the output projection
  assert "f32[2,5,3,2,4]" not in jaxpr and "f32[2,5,24]" not in jaxpr
  assert jaxpr.count("f32[2,5,8] = add") == 2  # q's bias and the output projection's
  assert nn.unbox(params)["params"]["qkv"]["kernel"].shape == (8, 3, 2, 4)


def test_window_attention_equals_the_reference_formula():
  """q·k / max(|q||k|, 1e-6) / max(τ, 0.01) + meta bias + shift mask, softmax, @ v."""
  module = decoder.WindowAttention(num_heads=2, window=(2, 2))
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 8))
  mask = jnp.asarray(decoder.shift_attention_mask((4, 4), (2, 2), 1))
  params = module.init(jax.random.key(1), x, mask)["params"]
  params = dict(params)
  params["tau"] = jnp.array([0.5, 0.005])  # the second head hits the 0.01 clamp
  out = module.apply({"params": params}, x, mask)

  qkv = layers.QKVProjection(2).apply({"params": params["qkv"]}, x)
  q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
  logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k)
  norms = jnp.einsum("bwqh,bwkh->bwhqk", jnp.linalg.norm(q, axis=-1), jnp.linalg.norm(k, axis=-1))
  logits /= jnp.maximum(norms, 1e-6)
  logits /= jnp.maximum(params["tau"], 0.01)[:, None, None]
  bias = decoder.MetaMlp(2, 0.0).apply({"params": params["meta_mlp"]},
                                       decoder.relative_coordinates_log((2, 2)))
  logits += bias.T.reshape(2, 4, 4) + mask[:, None]
  expected = jnp.einsum("bwhqk,bwkhd->bwqhd", jax.nn.softmax(logits, axis=-1), v)
  expected = layers.HeadsProjection(8).apply({"params": params["proj"]}, expected)
  np.testing.assert_allclose(out, expected, atol=2e-5)


def _phase_step_text(kind: str, lowering_platform: str, **model_overrides):
  """StableHLO text of the demo model's `kind` train step, lowered (not run) for a platform."""
  config = audio_config.get_config("demo")
  config.model.update(model_overrides.pop("model", {}))
  config.model.decoder.update(model_overrides.pop("decoder", {}))
  phase_config = config[f"{kind}_phase"]
  models = state_lib.build_models(config)
  tx = optim.adamw_direction(phase_config)
  groups = steps.PHASE_GROUPS[kind]

  fresh = state_lib.fresh_state_fn(models, groups, tx)
  state = jax.eval_shape(lambda rng: nn.unbox(fresh(rng)), jax.random.key(0))
  samples = audio.num_samples_for_frames(config.data.target_length, config.data.sample_rate)
  batch = {"waveform": jax.ShapeDtypeStruct((4, samples), jnp.float32),
           "valid_frames": jax.ShapeDtypeStruct((4,), jnp.int32)}
  step = steps.phase_step(models, kind, phase_config, tx)
  lowered = jax.jit(step).trace(state, batch, optim.warmup_cosine(1e-3, 0.0, 1, 10)).lower(
      lowering_platforms=(lowering_platform,))
  return lowered.as_text()


@pytest.fixture
def cudnn_lowering(monkeypatch):
  """Lets this CPU-only jax lower cuDNN attention for CUDA (it only checks the cuDNN version)."""
  fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  if not hasattr(fused, "check_cudnn_version"):
    pytest.skip("this jax version checks cuDNN differently")
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)


@pytest.mark.parametrize("kind", ["encoder", "tokenizer", "joint"])
def test_bf16_train_steps_lower_to_cudnn_flash_attention_on_gpu(cudnn_lowering, kind):
  text = _phase_step_text(kind, "cuda", model={"dtype": "bfloat16", "attention_impl": "cudnn"},
                          decoder={"attention_impl": "xla"})
  targets = set(re.findall(r"__cudnn\$\w+", text))
  assert targets == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}
  assert '"PADDING"' in text.replace('\\22', '"')  # the ViT's odd token count is padded
  # Nothing in the step talks to the host.
  assert not re.search(r"callback|outfeed|infeed|stablehlo\.send|stablehlo\.recv", text)


def test_xla_attention_stays_free_of_custom_calls():
  text = _phase_step_text("encoder", "cpu", model={"attention_impl": "xla"})
  assert "__cudnn" not in text and "custom_call" not in text


def _demo_loss(remat: str, loss_fn, window_impl: str = "xla", **kwargs):
  """(params, loss of params) of the demo model with blocks rematerialised as `remat` and
  the decoder's window attention as `window_impl`."""
  config = audio_config.get_config("demo")
  config.model.remat = remat
  config.model.decoder.attention_impl = window_impl
  models = state_lib.build_models(config)
  params = jax.jit(lambda key: nn.unbox(state_lib.init_params(models, key)))(jax.random.key(0))
  codebooks = quantizer.init(models.quantizer, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (2, *models.input_shape))
  return params, lambda p: loss_fn(models, p, codebooks, x, jax.random.key(3), **kwargs)[0]


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_wraps_every_block_of_every_module(remat):
  """Encoder, tokenizer and estimator blocks and the Swin decoder blocks are recomputed."""
  config = audio_config.get_config("demo")
  params, loss = _demo_loss(remat, steps.joint_phase_loss, with_tokenizer=True, ratio=0.2)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  model = config.model
  blocks = 2 * model.depth + model.decoder.depth + model.tokenizer.estimator_depth
  assert jaxpr.count("remat") >= blocks
  assert "remat" not in str(jax.make_jaxpr(jax.grad(_demo_loss(
      "none", steps.joint_phase_loss, with_tokenizer=True, ratio=0.2)[1]))(params))


def test_remat_keeps_params_loss_and_gradients():
  """Recomputing blocks changes memory, not the parameter tree or the numbers."""
  def loss_and_grads(remat):
    params, loss = _demo_loss(remat, steps.encoder_phase_loss, cold_start=False)
    return params, *jax.jit(jax.value_and_grad(loss))(params)

  params, loss, grads = loss_and_grads("none")
  params_r, loss_r, grads_r = loss_and_grads("full")
  assert jax.tree.structure(params) == jax.tree.structure(params_r)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"model.attention_impl": "flash"}, "^model.attention_impl: 'flash' is not one of"),
    ({"model.remat": "all"}, "^model.remat: 'all' is not one of"),
    ({"model.residual_stream_dtype": "bfloat16"},
     "^model.residual_stream_dtype: 'bfloat16' is not one of 'float32', 'compute'"),
    ({"model.gelu": "erf"}, "^model.gelu: 'erf' is not one of 'exact', 'tanh'"),
    ({"model.decoder.attention_impl": "cudnn"}, "^model.decoder.attention_impl: 'cudnn'"),
    ({"model.attention_impl": "cudnn"}, "^model.attention_impl: 'cudnn' needs model.dtype"),
    ({"model.decoder.attention_impl": "pallas", "model.decoder.window": (2, 2),
      "model.decoder.shift": 1},
     "^model.decoder.attention_impl: 'pallas': tokens per window must be a power of two"),
    ({"tokenizer_phase.restart_unused_every": 5, "model.quantizer.restart_unused": False},
     "^tokenizer_phase.restart_unused_every: restarts need"),
])
def test_config_names_a_bad_speed_or_restart_setting(overrides, message):
  config = audio_config.get_config("demo")
  config.data.manifest = config.data.label_csv = "x"
  config.update_from_flattened_dict(overrides)
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate_config(config)


@pytest.mark.parametrize("shift", [0, 2], ids=["unshifted", "shifted"])
def test_pallas_window_attention_equals_the_xla_one(shift):
  """The fused kernel (interpreted on this CPU) against the XLA path: in float32 the same
  output and gradients, tau and the meta-MLP bias included, also with the q/k/v bias
  (which the kernel adds on chip) away from its zero initialisation; in bfloat16 no
  further from the float32 numbers than the XLA path is (tau's gradient, a sum with
  cancellation, is where bfloat16 rounding shows most)."""
  grid, window = (8, 8), (4, 4)  # 4 windows of 16 tokens, head dim 16
  mask = decoder.shift_attention_mask(grid, window, shift) if shift else None
  x = jax.random.normal(jax.random.key(0), (2, 4, 16, 32)).astype(jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.key(1), x.shape)

  def value_and_grads(dtype, impl, qkv_bias=None):
    module = decoder.WindowAttention(num_heads=2, window=window, dtype=dtype,
                                     attention_impl=impl)
    params = dict(module.init(jax.random.key(2), x, mask)["params"])
    params["tau"] = jnp.array([0.3, 2.0])
    if qkv_bias is not None:
      params["qkv"] = dict(params["qkv"], bias=qkv_bias)
    loss = lambda p, x: jnp.sum(module.apply({"params": p}, x, mask).astype(jnp.float32)
                                * cotangent)
    out = jax.value_and_grad(loss, argnums=(0, 1))(params, x.astype(dtype))
    return jax.tree_util.tree_leaves_with_path(out)

  def errors(got, expected):
    """{leaf: max |got - expected| / max |expected|}, without the meta-MLP's output bias:
    it shifts all logits of a head, so its gradient is 0 up to rounding."""
    return {jax.tree_util.keystr(path): float(np.abs(np.float32(g) - e).max() / np.abs(e).max())
            for (path, e), (_, g) in zip(expected, got)
            if not ("fc2" in jax.tree_util.keystr(path) and "bias" in jax.tree_util.keystr(path))}

  qkv_bias = jax.random.normal(jax.random.key(3), (3, 2, 16))
  with_bias = errors(value_and_grads(jnp.float32, "pallas", qkv_bias),
                     value_and_grads(jnp.float32, "xla", qkv_bias))
  assert max(with_bias.values()) < 1e-4 and "['qkv']['bias']" in " ".join(with_bias)
  reference = value_and_grads(jnp.float32, "xla")
  assert max(errors(value_and_grads(jnp.float32, "pallas"), reference).values()) < 1e-4
  xla_bf16 = errors(value_and_grads(jnp.bfloat16, "xla"), reference)
  pallas_bf16 = errors(value_and_grads(jnp.bfloat16, "pallas"), reference)
  for leaf, error in pallas_bf16.items():
    assert error <= 1.25 * xla_bf16[leaf] + 1e-3, leaf


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_window_attention_gradients_stay_finite_for_zero_queries(impl):
  """An all-zero window gives q = k = 0 (zero biases at init): the 1e-6 clamp of the
  norm applies and the gradients are finite, not NaN."""
  module = decoder.WindowAttention(num_heads=2, window=(4, 4), attention_impl=impl)
  x = jax.random.normal(jax.random.key(0), (1, 2, 16, 32)).at[0, 1].set(0.0)
  params = module.init(jax.random.key(1), x)
  grads = jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1))(params, x)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("split_windows", [False, True], ids=["samples", "windows"])
def test_pallas_window_attention_runs_on_each_devices_share_of_a_sharded_batch(split_windows):
  """Samples split over 4 devices and heads over 2: each device runs the kernels on its
  own samples and heads (no all-gather of the activations), with the numbers of one
  device. Operands split inside a sample (a window's shift mask depends on its place in
  the sample) are regathered into whole samples first: still the same numbers."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 1, 2),
                           ("data", "fsdp", "model"))
  data, heads = ("data", "fsdp"), "model"
  keys = jax.random.split(jax.random.key(0), 5)
  qkv = jax.random.normal(keys[0], (8, 4, 16, 3, 2, 16))  # 8 samples of 4 windows
  qkv_bias = jax.random.normal(keys[3], (3, 2, 16))
  inv_tau = jnp.array([0.5, 1.5])
  bias = jax.random.normal(keys[1], (2, 16, 16))
  cotangent = jax.random.normal(keys[2], (8, 4, 16, 2, 16))
  mask = decoder.shift_attention_mask((8, 8), (4, 4), 2)  # differs between the 4 windows

  def loss(qkv, qkv_bias, inv_tau, bias, cotangent):
    out = window_attention_kernel.window_attention(qkv, inv_tau, bias, mask, qkv_bias=qkv_bias)
    return jnp.sum(out * cotangent)

  value_and_grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
  spec = lambda *axes: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
  samples, windows = (None, data) if split_windows else (data, None)
  per_qkv, per_out, per_head = (spec(samples, windows, None, None, heads),
                                spec(samples, windows, None, heads), spec(heads))
  per_qkv_bias = spec(None, heads)
  sharded = jax.jit(
      value_and_grads, in_shardings=(per_qkv, per_qkv_bias, per_head, per_head, per_out),
      out_shardings=(spec(), (per_qkv, per_qkv_bias, per_head, per_head)))
  args = (qkv, qkv_bias, inv_tau, bias, cotangent)
  if not split_windows:
    assert "all-gather" not in sharded.lower(*args).compile().as_text()
  for got, expected in zip(jax.tree.leaves(sharded(*args)),
                           jax.tree.leaves(jax.jit(value_and_grads)(*args))):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_pallas_window_attention_keeps_the_demo_encoder_step(remat):
  """The whole encoder-phase loss and gradients of the demo model (shifted and unshifted
  Swin blocks, in float32) are those of the XLA window attention, also when the blocks
  are recomputed in the backward pass."""
  def loss_and_grads(window_impl):
    params, loss = _demo_loss(remat, steps.encoder_phase_loss, window_impl, cold_start=False)
    return jax.jit(jax.value_and_grad(loss))(params)

  expected, got = loss_and_grads("xla"), loss_and_grads("pallas")
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
  for g, e in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)


def test_bf16_encoder_step_on_a_gpu_defaults_to_cudnn_and_the_window_kernel(
    monkeypatch, cudnn_lowering):
  """With the default attention settings, a bf16 encoder step on a GPU runs the ViTs'
  attention through cuDNN and the decoder's windows as one Triton kernel forward and one
  backward per Swin block."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
  gpu_info = getattr(registration, "gpu_info_lib", None)
  if gpu_info is not None:  # jax 0.11 asks the GPU for its compute capability: an H100's
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.get_gpu_info_from_version(
        gpu_info.GpuVersion.H100))
  text = _phase_step_text("encoder", "cuda", model={"dtype": "bfloat16"})
  depth = audio_config.get_config("demo").model.decoder.depth
  assert text.count("__gpu$xla.gpu.triton") == 2 * depth
  assert "__cudnn$fmhaSoftmax" in text
