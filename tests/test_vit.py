"""Shared layers and the ViT encoder: shapes, parameter counts (§7.4), axis names, token order,
bf16 numerics (residual stream, bias gradients)."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bridle_jax.models import layers, masking, quantizer
from bridle_jax.models.layers import Attention, Block, Mlp, PatchEmbed, gelu, gelu_tanh
from bridle_jax.models.pos_embed import audio_pos_embed
from bridle_jax.models.vit import Encoder, encoder_from_config, residual_stream_dtype
from bridle_jax.train import state as state_lib
from bridle_jax.train import steps
from configs import audio as audio_config

AUDIO_GRID = (64, 8)  # 1024 frames x 128 mel bins, patch 16
RNGS = {'params': jax.random.key(0), 'mask': jax.random.key(1)}


def vit_b_audio_config(**overrides):
  cfg = dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16, in_chans=1,
             mask_ratio=0.8, mask_2d=False, mask_t_prob=0.7, mask_f_prob=0.3,
             pos_grid='reference', dtype='bfloat16')
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def numel(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def vit_b_abstract():
  encoder = encoder_from_config(vit_b_audio_config(), AUDIO_GRID)
  x = jax.ShapeDtypeStruct((2, 1024, 128), jnp.float32)
  boxed = jax.eval_shape(lambda x: encoder.init(RNGS, x, apply_mask=True), x)
  return encoder, x, boxed


def test_vit_b_shapes(vit_b_abstract):
  encoder, x, boxed = vit_b_abstract
  variables = nn.unbox(boxed)
  masked = jax.eval_shape(
      lambda v, x: encoder.apply(v, x, apply_mask=True, rngs={'mask': RNGS['mask']}),
      variables, x)
  assert [o.shape for o in masked] == [(2, 103, 768), (2, 512), (2, 512)]
  assert masked[0].dtype == jnp.bfloat16
  full = jax.eval_shape(encoder.apply, variables, x)
  assert [o.shape for o in full] == [(2, 513, 768), (2, 512), (2, 512)]
  encoder_2d = encoder.clone(mask_2d=True)
  masked_2d = jax.eval_shape(
      lambda v, x: encoder_2d.apply(v, x, apply_mask=True, rngs={'mask': RNGS['mask']}),
      variables, x)
  assert masked_2d[0].shape == (2, 96, 768)


def test_vit_b_parameter_counts(vit_b_abstract):
  _, _, boxed = vit_b_abstract
  params = boxed['params']
  assert set(params) == {'patch_embed', 'cls_token', 'norm'} | {f'blocks_{i}' for i in range(12)}
  pos_numel = audio_pos_embed(*AUDIO_GRID, 768).size
  assert pos_numel == 393_984
  assert numel(params) == 85_254_144
  assert numel(params) + pos_numel == 85_648_128
  assert numel(params['blocks_0']) == 7_087_872
  block = jax.eval_shape(Block(12).init, jax.random.key(0), jnp.zeros((1, 4, 768)))
  assert numel(block) == 7_087_872


def test_every_param_has_logical_axes(vit_b_abstract):
  _, _, boxed = vit_b_abstract
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  for leaf in leaves:
    assert len(leaf.names) == len(leaf.value.shape)
  specs = nn.get_partition_spec(boxed)['params']
  assert tuple(specs['blocks_0']['attn']['qkv']['kernel']) == ('embed', None, 'heads', 'kv')
  assert tuple(specs['blocks_0']['attn']['proj']['kernel']) == ('heads', 'kv', 'embed')
  assert tuple(specs['blocks_0']['mlp']['fc1']['kernel']) == ('embed', 'mlp')
  assert tuple(specs['norm']['scale']) == ('embed',)
  assert tuple(specs['patch_embed']['proj']['kernel']) == (None, None, 'patch', 'embed')


def small_encoder(**overrides):
  fields = dict(grid=(4, 2), width=32, depth=1, num_heads=2, patch_size=4, mask_ratio=0.5)
  fields.update(overrides)
  return Encoder(**fields)


def test_bf16_compute_keeps_float32_params():
  encoder = small_encoder(dtype=jnp.bfloat16)
  x = jnp.ones((2, 16, 8))
  variables = jax.jit(encoder.init)(RNGS, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
  features, _, _ = jax.jit(encoder.apply)(variables, x)
  assert features.dtype == jnp.bfloat16 and features.shape == (2, 9, 32)


def test_token_order_time_major():
  # Patch (t=5, f=3) of a 1024x128 fbank is token 8 * 5 + 3 = 43, output row 44 after CLS.
  x = jnp.zeros((1, 1024, 128))
  bumped = x.at[0, 5 * 16:6 * 16, 3 * 16:4 * 16].set(1.0)
  embed = PatchEmbed(8, 16)
  variables = jax.jit(embed.init)(jax.random.key(0), x)
  diff = jax.jit(lambda v: embed.apply(v, bumped) - embed.apply(v, x))(variables)
  np.testing.assert_array_equal(np.flatnonzero(np.abs(diff).sum(-1)[0]), [43])
  encoder = Encoder(grid=AUDIO_GRID, width=8, depth=0, num_heads=2)
  variables = jax.jit(encoder.init)(RNGS, x)
  diff = jax.jit(lambda v: encoder.apply(v, bumped)[0] - encoder.apply(v, x)[0])(variables)
  np.testing.assert_array_equal(np.flatnonzero(np.abs(diff).sum(-1)[0]), [44])


def test_masked_tokens_are_the_kept_subset():
  # Without blocks every output row depends on its own token only.
  encoder = small_encoder(depth=0)
  x = jax.random.normal(jax.random.key(3), (3, 16, 8))
  variables = jax.jit(encoder.init)(RNGS, x)
  full, _, _ = jax.jit(encoder.apply)(variables, x)
  masked, mask, ids_restore = jax.jit(lambda v: encoder.apply(
      v, x, apply_mask=True, rngs={'mask': jax.random.key(4)}))(variables)
  assert masked.shape == (3, 5, 32) and np.asarray(mask).sum() == 3 * 4
  ids_keep = np.argsort(np.asarray(ids_restore), axis=1)[:, :4]
  np.testing.assert_allclose(masked[:, 1:], np.take_along_axis(
      np.asarray(full[:, 1:]), ids_keep[:, :, None], axis=1), atol=1e-6)
  np.testing.assert_allclose(masked[:, 0], full[:, 0], atol=1e-6)


def test_attention_matches_pytorch_layout():
  # A PyTorch qkv weight (3D, D), rows [q | k | v] head-major, maps over by reshape + transpose.
  width, heads, tokens = 8, 2, 5
  head_dim = width // heads
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, tokens, width)).astype(np.float32)
  w_qkv, b_qkv = rng.normal(size=(3 * width, width)), rng.normal(size=(3 * width,))
  w_proj, b_proj = rng.normal(size=(width, width)), rng.normal(size=(width,))
  params = {'qkv': {'kernel': w_qkv.reshape(3, heads, head_dim, width).transpose(3, 0, 1, 2),
                    'bias': b_qkv.reshape(3, heads, head_dim)},
            'proj': {'kernel': w_proj.T.reshape(heads, head_dim, width), 'bias': b_proj}}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  out = jax.jit(Attention(heads).apply)({'params': params}, x)

  qkv = (x[0] @ w_qkv.T + b_qkv).reshape(tokens, 3, heads, head_dim).transpose(1, 2, 0, 3)
  q, k, v = qkv
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(head_dim)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = (probs @ v).transpose(1, 0, 2).reshape(tokens, width) @ w_proj.T + b_proj
  np.testing.assert_allclose(out[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('valid_length', [None, 4])
def test_attention_with_folded_biases_keeps_outputs_and_gradients(valid_length):
  """Attention adds only the q bias before softmax and folds the v bias into the output
  projection: outputs and every gradient equal the textbook form that biases q, k and v
  (the k bias's gradient is zero in both, up to rounding), also with padded keys."""
  width, heads, tokens = 8, 2, 5
  module = Attention(heads)
  x = jax.random.normal(jax.random.key(0), (3, tokens, width))
  params = jax.tree.map(lambda a: jax.random.normal(jax.random.key(a.size), a.shape),
                        nn.unbox(module.init(jax.random.key(1), x))['params'])
  cotangent = jax.random.normal(jax.random.key(2), x.shape)
  keys = tokens if valid_length is None else valid_length

  def textbook(p, x):
    q, k, v = (jnp.einsum('bnd,dhk->bnhk', x, p['qkv']['kernel'][:, i]) + p['qkv']['bias'][i]
               for i in range(3))
    logits = jnp.einsum('bqhk,bshk->bhqs', q, k)[..., :keys] / np.sqrt(width // heads)
    out = jnp.einsum('bhqs,bshk->bqhk', jax.nn.softmax(logits, axis=-1), v[:, :keys])
    return jnp.einsum('bqhk,hkd->bqd', out, p['proj']['kernel']) + p['proj']['bias']

  def value_and_grads(fn):
    return jax.value_and_grad(lambda p, x: jnp.sum(fn(p, x) * cotangent), argnums=(0, 1))(
        params, x)

  (got, got_grads), (want, want_grads) = (
      value_and_grads(lambda p, x: module.apply({'params': p}, x, valid_length)),
      value_and_grads(textbook))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got_grads[0]['qkv']['bias'][1], 0.0)
  np.testing.assert_allclose(want_grads[0]['qkv']['bias'][1], 0.0, atol=1e-4)


def test_initialisation_bounds():
  width = 96
  encoder = small_encoder(width=width, num_heads=3)
  params = nn.unbox(jax.jit(encoder.init)(RNGS, jnp.zeros((1, 16, 8))))['params']
  block = params['blocks_0']
  qkv = np.asarray(block['attn']['qkv']['kernel'])
  bound = np.sqrt(6 / (width + 3 * width))  # Xavier over the fused (D, 3D) fan
  assert 0.95 * bound < np.abs(qkv).max() <= bound
  assert not np.asarray(block['attn']['qkv']['bias']).any()
  np.testing.assert_array_equal(block['norm1']['scale'], 1.0)
  patch_fan_in = 4 * 4  # 1 channel, 4x4 patches
  bound = np.sqrt(6 / (patch_fan_in + width))
  assert 0.95 * bound < np.abs(params['patch_embed']['proj']['kernel']).max() <= bound
  bias = np.abs(params['patch_embed']['proj']['bias'])
  assert 0.9 / np.sqrt(patch_fan_in) < bias.max() <= 1 / np.sqrt(patch_fan_in)
  cls = params['cls_token']
  assert cls.shape == (1, 1, width) and 0.01 < float(np.std(cls)) < 0.03


def test_patch_embed_equals_strided_conv():
  # The reshape + matmul must compute the reference's stride-p conv on any (B, H, W, C) input.
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 12, 8, 3)), jnp.float32)
  embed = PatchEmbed(6, 4)
  variables = nn.unbox(embed.init(jax.random.key(0), x))
  kernel = variables['params']['proj']['kernel']
  bias = variables['params']['proj']['bias']
  assert kernel.shape == (4, 4, 3, 6) and bias.shape == (6,)
  conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(embed.apply(variables, x), (conv + bias).reshape(2, 6, 6),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='not a multiple of patch size 4'):
    embed.apply(variables, x[:, :10])


def test_gelu_is_the_exact_erf_form_with_its_derivative():
  # Against float64 x·Φ(x) and Φ(x) + x·φ(x), over the range where both tails matter.
  x = np.concatenate([np.linspace(-9.0, 9.0, 2001), [-40.0, 0.0, 40.0]])
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  slope = cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
  value, grad = jax.jit(jax.vmap(jax.value_and_grad(gelu)))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(value, x * cdf, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(grad, slope, rtol=1e-5, atol=2e-6)
  # bf16 in, bf16 out; the value is the float32 result rounded once.
  xb = jnp.asarray(x, jnp.bfloat16)
  yb = jax.jit(gelu)(xb)
  assert yb.dtype == jnp.bfloat16
  exact = np.asarray(xb, np.float64) * 0.5 * (
      1.0 + np.vectorize(math.erf)(np.asarray(xb, np.float64) / math.sqrt(2.0)))
  np.testing.assert_allclose(np.asarray(yb, np.float64), exact, rtol=2 ** -8, atol=1e-6)
  _, vjp = jax.vjp(gelu, xb)
  assert vjp(jnp.ones_like(xb))[0].dtype == jnp.bfloat16


def test_tanh_gelu_is_the_approximation_with_its_derivative():
  # Against float64 0.5·x·(1 + tanh(u)), u = √(2/π)(x + 0.044715x³), and its derivative.
  x = np.concatenate([np.linspace(-9.0, 9.0, 2001), [-40.0, 0.0, 40.0]])
  c = math.sqrt(2.0 / math.pi)
  t = np.tanh(c * (x + 0.044715 * x ** 3))
  slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
  value, grad = jax.jit(jax.vmap(jax.value_and_grad(gelu_tanh)))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(value, 0.5 * x * (1.0 + t), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(grad, slope, rtol=1e-5, atol=2e-6)
  # Off the exact GELU by under 5e-4 anywhere, far below bf16's rounding of values near 1.
  exact = jax.jit(gelu)(jnp.asarray(x, jnp.float32))
  gap = np.abs(np.asarray(value) - np.asarray(exact))
  assert 1e-4 < gap.max() < 5e-4
  # Off a GPU, bf16 in is computed in float32 and rounded once.
  xb = jnp.asarray(x, jnp.bfloat16)
  yb = jax.jit(gelu_tanh)(xb)
  assert yb.dtype == jnp.bfloat16
  # Both compiled: with jaxlib 0.11.2, XLA:CPU's tanh run op by op differs by up to 2e-6.
  rounded_once = jax.jit(
      lambda x: jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(yb, np.float32),
                                np.asarray(rounded_once(xb), np.float32))


def test_mlp_gelu_forms():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  outputs = {}
  for form in ("exact", "tanh"):
    mlp = Mlp(gelu=form)
    params = mlp.init(jax.random.PRNGKey(1), x)
    outputs[form] = mlp.apply(params, x)
  assert 0 < float(jnp.max(jnp.abs(outputs["exact"] - outputs["tanh"]))) < 1e-3
  with pytest.raises(ValueError, match="gelu 'relu' is not one of 'exact', 'tanh'"):
    Mlp(gelu="relu").init(jax.random.PRNGKey(1), x)


def _demo_tokenizer_phase(dtype, residual_stream_dtype):
  """(dtypes of every ViT block's output, tokenizer-phase loss, its gradient) on the demo."""
  config = audio_config.get_config('demo')
  config.model.dtype = dtype
  config.model.residual_stream_dtype = residual_stream_dtype
  models = state_lib.build_models(config)
  params = jax.jit(lambda key: nn.unbox(state_lib.init_params(models, key)))(jax.random.key(0))
  codebooks = quantizer.init(models.quantizer, jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), (4, *models.input_shape))

  block_dtypes = set()
  for module, name, variables, args in (
      (models.encoder, 'encoder', params['encoder'], (x,)),
      (models.tokenizer, 'tokenizer', params['tokenizer'], (x,)),
      (models.estimator, 'estimator', params['estimator'],
       (jnp.ones((4, models.encoder.num_patches, config.model.quantizer.code_dim)),))):
    _, state = jax.eval_shape(functools.partial(module.apply, capture_intermediates=True),
                              {'params': variables}, *args)
    for block, outputs in state['intermediates'].items():
      if 'blocks_' in block:
        block_dtypes.add((name, jnp.dtype(outputs['__call__'][0].dtype).name))

  def loss(p):
    return steps.tokenizer_phase_loss(models, p, codebooks, x, jax.random.key(3))[0]
  return block_dtypes, *jax.jit(jax.value_and_grad(loss))(params)


def test_compute_dtype_residual_stream_is_bf16_between_blocks_and_close_to_float32():
  """'compute' carries the encoder's, tokenizer's and estimator's tokens in bf16 between
  blocks (float32 by default, and with a float32 model whatever the setting); the loss and
  gradients stay within bf16 rounding of the float32 stream's."""
  dtypes_f32, loss_f32, grads_f32 = _demo_tokenizer_phase('bfloat16', 'float32')
  dtypes_bf16, loss_bf16, grads_bf16 = _demo_tokenizer_phase('bfloat16', 'compute')
  modules = ('encoder', 'tokenizer', 'estimator')
  assert dtypes_f32 == {(m, 'float32') for m in modules}
  assert dtypes_bf16 == {(m, 'bfloat16') for m in modules}
  float32_model = ml_collections.ConfigDict(dict(dtype='float32', residual_stream_dtype='compute'))
  assert residual_stream_dtype(float32_model) == jnp.float32

  assert abs(float(loss_bf16) - float(loss_f32)) < 0.01 * abs(float(loss_f32))
  flat = lambda tree: jnp.concatenate([g.ravel() for g in jax.tree.leaves(tree)])
  g_f32, g_bf16 = flat(grads_f32['tokenizer']), flat(grads_bf16['tokenizer'])
  assert float(jnp.linalg.norm(g_bf16 - g_f32) / jnp.linalg.norm(g_f32)) < 0.05


def _quarters(key, shape):
  """Random multiples of 1/4 in [1/4, 2]: exact in bf16, and their sums exact in float32."""
  return jax.random.randint(key, shape, 1, 9).astype(jnp.float32) / 4


@pytest.mark.parametrize('module, x_shape', [
    (layers.Dense(8, (None, None), jnp.bfloat16), (16, 512, 8)),
    (layers.QKVProjection(2, jnp.bfloat16), (16, 512, 8)),
    (layers.QKVProjection(2, jnp.bfloat16, fused=False), (16, 512, 8)),
    (layers.HeadsProjection(8, jnp.bfloat16), (16, 512, 2, 4)),
    (layers.PatchProjection(8, jnp.bfloat16), (16, 512, 2, 2, 1)),
], ids=['dense', 'qkv_fused', 'qkv_split', 'heads', 'patch'])
def test_bf16_layers_sum_bias_gradients_in_float32(module, x_shape):
  """Summed over 8192 tokens, a bf16 layer's bias gradient is exact: it is not summed in
  16 bits, which hold integers exactly only up to 256."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  params = nn.unbox(module.init(jax.random.key(1), x))
  outputs = jax.tree.leaves(jax.eval_shape(module.apply, params, x))
  weights = [_quarters(jax.random.key(i), o.shape) for i, o in enumerate(outputs)]

  def loss(p):
    return sum(jnp.sum(o.astype(jnp.float32) * w)
               for o, w in zip(jax.tree.leaves(module.apply(p, x)), weights))

  grad = jax.jit(jax.grad(loss))(params)['params']['bias']
  total = lambda w, trailing: np.asarray(w, np.float64).reshape(-1, *trailing).sum(0)
  if len(weights) == 4:  # split: q biased, k unbiased, the value bias returned as it is
    q_sum = total(weights[0], grad.shape[1:])
    np.testing.assert_array_equal(grad, np.stack([q_sum, np.zeros_like(q_sum), weights[3]]))
  else:
    np.testing.assert_array_equal(grad, total(weights[0], grad.shape))


def test_restored_mask_token_gradient_sums_in_float32():
  """The decoder's mask token fills 6,000 bf16 positions; its gradient sums them exactly."""
  kept = jnp.zeros((16, 100, 8), jnp.bfloat16)
  ids_restore = jnp.broadcast_to(jnp.arange(475, dtype=jnp.int32), (16, 475))
  fill = jnp.zeros((1, 1, 8), jnp.float32)
  weights = _quarters(jax.random.key(0), (16, 475, 8))
  grad = jax.grad(lambda f: jnp.sum(masking.restore_tokens(kept, ids_restore, f)
                                    .astype(jnp.float32) * weights))(fill)
  np.testing.assert_array_equal(grad[0, 0], np.asarray(weights[:, 100:], np.float64).sum((0, 1)))
