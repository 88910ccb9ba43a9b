"""Tokenizer (cold-start and full paths) and estimator: shapes, parameter counts (§7.4), wiring."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bridle_jax.models.pos_embed import audio_pos_embed
from bridle_jax.models.tokenizer import (Estimator, Tokenizer, estimator_from_config,
                                         tokenizer_from_config)

AUDIO_GRID = (64, 8)


def vit_b_audio_config():
  return ml_collections.ConfigDict(dict(
      width=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16, in_chans=1,
      pos_grid='reference', dtype='bfloat16', tokenizer=dict(estimator_depth=3),
      quantizer=dict(code_dim=256)))


def numel(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def vit_b_tokenizer():
  tokenizer = tokenizer_from_config(vit_b_audio_config(), AUDIO_GRID)
  x = jax.ShapeDtypeStruct((2, 1024, 128), jnp.float32)
  variables = nn.unbox(jax.eval_shape(lambda x: tokenizer.init(jax.random.key(0), x), x))
  return tokenizer, x, variables


def test_vit_b_tokenizer_shapes(vit_b_tokenizer):
  tokenizer, x, variables = vit_b_tokenizer
  for cold_start in (False, True):
    z = jax.eval_shape(lambda v, x: tokenizer.apply(v, x, cold_start=cold_start), variables, x)
    assert z.shape == (2, 512, 256) and z.dtype == jnp.float32


def test_vit_b_tokenizer_parameter_counts(vit_b_tokenizer):
  tokenizer, x, variables = vit_b_tokenizer
  cold_init = jax.eval_shape(lambda x: tokenizer.init(jax.random.key(0), x, cold_start=True), x)
  assert jax.tree.structure(nn.unbox(cold_init)) == jax.tree.structure(variables)
  params = dict(variables['params'])
  cold_start = params.pop('cold_start_encoder')
  quantize_layer = params.pop('quantize_layer')
  assert set(params) == {'patch_embed', 'cls_token', 'norm'} | {f'blocks_{i}' for i in range(12)}
  assert numel(params) + audio_pos_embed(*AUDIO_GRID, 768).size == 85_648_128
  assert set(cold_start) == {'kernel'} and numel(cold_start) == 196_608
  assert set(quantize_layer) == {'fc1', 'fc2'} and numel(quantize_layer) == 787_456


def test_vit_b_estimator():
  estimator = estimator_from_config(vit_b_audio_config(), AUDIO_GRID)
  z_q = jax.ShapeDtypeStruct((2, 512, 256), jnp.float32)
  boxed = jax.eval_shape(lambda z: estimator.init(jax.random.key(0), z), z_q)
  params = boxed['params']
  assert set(params) == {'estimator_embed', 'estimator_norm', 'estimator_pred'} | {
      f'estimator_blocks_{i}' for i in range(3)}
  pos_numel = audio_pos_embed(*AUDIO_GRID, 768, cls=False).size
  assert pos_numel == 393_216
  assert numel(params) + pos_numel == 22_446_336
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  out = jax.eval_shape(estimator.apply, nn.unbox(boxed), z_q)
  assert out.shape == (2, 512, 768) and out.dtype == jnp.float32


def test_cold_start_is_a_linear_map_of_embedded_patches():
  tokenizer = Tokenizer(grid=(4, 2), width=32, depth=1, num_heads=2, patch_size=4, code_dim=8)
  x = jax.random.normal(jax.random.key(1), (2, 16, 8))
  params = nn.unbox(jax.jit(tokenizer.init)(jax.random.key(0), x))['params']
  apply = jax.jit(lambda p, cold_start: tokenizer.apply({'params': p}, x, cold_start),
                  static_argnums=1)
  z_cold = apply(params, True)
  tokens = jax.jit(lambda p: tokenizer.apply({'params': p}, x, method=Tokenizer.embed))(params)
  np.testing.assert_allclose(z_cold, tokens @ params['cold_start_encoder']['kernel'],
                             rtol=1e-5, atol=1e-5)
  # The full path uses the transformer and quantize_layer; the cold-start path does not.
  perturbed = jax.tree.map(lambda p: p, params)
  perturbed['blocks_0']['mlp']['fc2']['bias'] = jnp.arange(32.0)
  np.testing.assert_array_equal(apply(perturbed, True), z_cold)
  assert np.abs(apply(perturbed, False) - apply(params, False)).max() > 1e-3


def test_small_estimator_runs_in_bfloat16():
  estimator = Estimator(grid=(4, 2), teacher_width=24, width=32, depth=1, num_heads=2,
                        dtype=jnp.bfloat16)
  z_q = jnp.ones((2, 8, 8))
  variables = jax.jit(estimator.init)(jax.random.key(0), z_q)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
  out = jax.jit(estimator.apply)(variables, z_q)
  assert out.shape == (2, 8, 24) and out.dtype == jnp.float32
  # Identical codes everywhere: only the positional embedding tells tokens apart.
  assert np.abs(np.asarray(out[0, 0]) - np.asarray(out[0, 1])).max() > 1e-3


@pytest.mark.parametrize('cold_start', [True, False])
def test_bfloat16_tokenizer_hands_the_quantizer_unrounded_float32_z(cold_start):
  """Under bf16 compute the last matmul's float32 accumulator is z: rounding it to bf16
  first would move the quantizer's nearest-code choices."""
  tokenizer = Tokenizer(grid=(4, 2), width=32, depth=1, num_heads=2, patch_size=4, code_dim=8,
                        dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 16, 8))
  params = nn.unbox(jax.jit(tokenizer.init)(jax.random.key(0), x))['params']
  z = jax.jit(lambda p: tokenizer.apply({'params': p}, x, cold_start))(params)
  assert z.dtype == jnp.float32
  rounded = np.asarray(z.astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(np.asarray(z) != rounded) > 0.5
