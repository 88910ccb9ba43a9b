"""Decoder: Swin window attention against a per-window loop, masks, un-shuffle, sizes."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax.models import decoder as dec
from bridle_jax.models import pos_embed
from configs import audio

WIDTH, HEADS = 16, 2


def _randomised(params, seed=0):
  """Every parameter redrawn (tau in [0.3, 1.5]) so no term of the block is trivially 0 or 1."""
  rng = np.random.default_rng(seed)

  def draw(path, p):
    if path[-1].key == "tau":
      return jnp.asarray(rng.uniform(0.3, 1.5, p.shape), p.dtype)
    return jnp.asarray(rng.normal(0.0, 0.4, p.shape), p.dtype)
  return jax.tree_util.tree_map_with_path(draw, params)


def _layer_norm(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _naive_swin_block(p, x, grid, window, shift):
  """Reference semantics, one window and one head at a time, float64 NumPy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  batch, length, width = x.shape
  (grid_t, grid_f), (wt, wf) = grid, window
  attn = p["attn"]
  heads = attn["tau"].shape[0]
  n = wt * wf

  bias = np.zeros((heads, n, n))
  for a in range(n):
    for b in range(n):
      delta = np.array([a // wf - b // wf, a % wf - b % wf], np.float64)
      coord = np.sign(delta) * np.log(1.0 + np.abs(delta))
      hidden = np.maximum(coord @ attn["meta_mlp"]["fc1"]["kernel"]
                          + attn["meta_mlp"]["fc1"]["bias"], 0.0)
      bias[:, a, b] = hidden @ attn["meta_mlp"]["fc2"]["kernel"] + attn["meta_mlp"]["fc2"]["bias"]

  def region(t):  # time-row region of the rolled grid
    return 0 if t < grid_t - wt else (1 if t < grid_t - shift else 2)

  rolled = np.roll(x.reshape(batch, grid_t, grid_f, width), -shift, axis=1)
  out = np.zeros_like(rolled)
  for bi in range(batch):
    for ti in range(grid_t // wt):
      for fi in range(grid_f // wf):
        rows = [ti * wt + a // wf for a in range(n)]
        cols = [fi * wf + a % wf for a in range(n)]
        tokens = rolled[bi, rows, cols]
        qkv = np.einsum("nd,dshk->nshk", tokens, attn["qkv"]["kernel"]) + attn["qkv"]["bias"]
        heads_out = np.zeros((n, heads, width // heads))
        for h in range(heads):
          q, k, v = qkv[:, 0, h], qkv[:, 1, h], qkv[:, 2, h]
          norms = np.linalg.norm(q, axis=-1)[:, None] * np.linalg.norm(k, axis=-1)[None, :]
          logits = q @ k.T / np.maximum(norms, 1e-6) / max(attn["tau"][h], 0.01) + bias[h]
          if shift:
            for a in range(n):
              for b in range(n):
                if region(rows[a]) != region(rows[b]):
                  logits[a, b] -= 100.0
          probs = np.exp(logits - logits.max(-1, keepdims=True))
          heads_out[:, h] = (probs / probs.sum(-1, keepdims=True)) @ v
        out[bi, rows, cols] = (np.einsum("nhk,hkd->nd", heads_out, attn["proj"]["kernel"])
                               + attn["proj"]["bias"])
  y = np.roll(out, shift, axis=1).reshape(batch, length, width)
  x = x + _layer_norm(y, p["norm1"]["scale"], p["norm1"]["bias"], 1e-5)
  mlp = p["mlp"]
  y = _gelu(x @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"])
  y = y @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
  return x + _layer_norm(y, p["norm2"]["scale"], p["norm2"]["bias"], 1e-5)


def _windows(x, grid):
  """(B, L, C) tokens in row-major grid order -> the block's (B, windows, n, C)."""
  return dec.partition_windows(x.reshape(x.shape[0], *grid, x.shape[-1]), (4, 4))


def _tokens(windows, grid):
  return dec.merge_windows(windows, grid, (4, 4)).reshape(windows.shape[0], -1,
                                                          windows.shape[-1])


def _swin_block_and_params(grid, shift, seed=0, output_scale=1.0):
  """Block with random parameters and an input in windows; `output_scale` shrinks attn/MLP
  outputs so LN eps matters."""
  block = dec.SwinBlock(HEADS, grid, (4, 4), shift, meta_mlp_dropout=0.1)
  x = _windows(jax.random.normal(jax.random.key(seed), (2, grid[0] * grid[1], WIDTH)), grid)
  params = _randomised(nn.unbox(block.init(jax.random.key(1), x)["params"]), seed)
  params["attn"]["proj"] = jax.tree.map(lambda a: a * output_scale, params["attn"]["proj"])
  params["mlp"]["fc2"] = jax.tree.map(lambda a: a * output_scale, params["mlp"]["fc2"])
  return block, params, x


@pytest.mark.parametrize("grid,shift,output_scale",
                         [((8, 8), 0, 1.0), ((16, 8), 2, 1.0), ((8, 4), 1, 1.0),
                          ((8, 8), 2, 1e-3)])
def test_swin_block_matches_per_window_loop(grid, shift, output_scale):
  block, params, x = _swin_block_and_params(grid, shift, output_scale=output_scale)
  got = _tokens(block.apply({"params": params}, x), grid)
  want = _naive_swin_block(params, _tokens(x, grid), grid, (4, 4), shift)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_partition_windows_index_layout():
  grid_t, grid_f = 16, 8
  token = np.arange(grid_t * grid_f).reshape(1, grid_t, grid_f, 1)
  windows = np.asarray(dec.partition_windows(token, (4, 4)))[0, :, :, 0]
  for t in range(grid_t):
    for f in range(grid_f):
      assert windows[2 * (t // 4) + f // 4, 4 * (t % 4) + f % 4] == grid_f * t + f
  merged = dec.merge_windows(dec.partition_windows(token, (4, 4)), (grid_t, grid_f), (4, 4))
  np.testing.assert_array_equal(merged, token)


@pytest.mark.parametrize("shift", [-3, -2, -1, 1, 2, 3, 6, -17])
def test_shift_windows_rolls_the_grid_in_the_window_layout(shift):
  grid = (16, 8)
  x = jax.random.normal(jax.random.key(0), (2, 16, 8, 3))
  want = dec.partition_windows(jnp.roll(x, shift, axis=1), (4, 4))
  got = dec.shift_windows(dec.partition_windows(x, (4, 4)), grid, (4, 4), shift)
  np.testing.assert_array_equal(got, want)


def test_shift_mask_touches_only_wrapped_windows():
  mask = dec.shift_attention_mask((64, 8), (4, 4), 2)
  assert mask.shape == (32, 16, 16)
  touched = np.flatnonzero(np.abs(mask).sum(axis=(1, 2)))
  np.testing.assert_array_equal(touched, [30, 31])
  assert set(np.unique(mask)) == {0.0, -100.0}
  upper = np.arange(16) // 4 < 2  # rows 60, 61 vs. rows 62, 63 of the rolled grid
  want = np.where(upper[:, None] != upper[None, :], -100.0, 0.0)
  np.testing.assert_array_equal(mask[30], want)
  np.testing.assert_array_equal(mask[31], want)


def test_relative_coordinates_log_table():
  table = dec.relative_coordinates_log((4, 4))
  assert table.shape == (256, 2)
  for a in range(16):
    for b in range(16):
      delta = np.array([a // 4 - b // 4, a % 4 - b % 4])
      np.testing.assert_allclose(table[16 * a + b], np.sign(delta) * np.log1p(np.abs(delta)),
                                 rtol=1e-6)
  np.testing.assert_allclose(table[15], [-np.log(4.0), -np.log(4.0)], rtol=1e-6)


def test_tau_clamped_at_001():
  block, params, x = _swin_block_and_params((8, 8), 2)

  def run(tau):
    p = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.full_like(a, tau) if path[-1].key == "tau" else a, params)
    return np.asarray(block.apply({"params": p}, x))
  np.testing.assert_array_equal(run(1e-3), run(0.01))
  assert not np.allclose(run(0.01), run(0.02))


def test_meta_mlp_dropout_needs_rng_and_train_mode():
  block, params, x = _swin_block_and_params((8, 8), 0)
  eval_out = block.apply({"params": params}, x)
  train_out = block.apply({"params": params}, x, deterministic=False,
                          rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(eval_out, train_out)


def _tiny_decoder(mode, **kw):
  return dec.Decoder(grid=(16, 4), num_tokens=12, mode=mode, width=WIDTH, depth=2,
                     num_heads=HEADS, **kw)


def _encoder_output(batch=2, kept=5, width=24, length=64, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(k1, (batch, 1 + kept, width))
  ids_shuffle = jnp.argsort(jax.random.uniform(k2, (batch, length)), axis=1)
  return x, jnp.argsort(ids_shuffle, axis=1), ids_shuffle[:, :kept]


@pytest.mark.parametrize("mode,pos_grid", [(0, "reference"), (1, "time_freq"), (2, "reference")])
def test_decoder_unshuffle_with_identity_blocks(mode, pos_grid):
  """Zeroed blocks are the identity; the output then shows where each token landed."""
  model = _tiny_decoder(mode, pos_grid=pos_grid)
  x, ids_restore, ids_keep = _encoder_output()
  params = _randomised(nn.unbox(model.init(jax.random.key(0), x, ids_restore)["params"]))
  params = {k: jax.tree.map(jnp.zeros_like, v) if k.startswith("decoder_blocks_") else v
            for k, v in params.items()}
  got = np.asarray(model.apply({"params": params}, x, ids_restore))
  assert got.shape == (2, 64, 12) and got.dtype == np.float32

  p = jax.tree.map(np.asarray, params)
  embedded = np.asarray(x) @ p["decoder_embed"]["kernel"] + p["decoder_embed"]["bias"]
  tokens = np.broadcast_to(p["mask_token"][0], (2, 64, WIDTH)).copy()
  for b in range(2):
    tokens[b, np.asarray(ids_keep[b])] = embedded[b, 1:]
  tokens += pos_embed.audio_pos_embed(16, 4, WIDTH, grid=pos_grid)[1:]
  normed = _layer_norm(tokens, p["decoder_norm"]["scale"], p["decoder_norm"]["bias"], 1e-6)
  want = normed @ p["decoder_pred"]["kernel"] + p["decoder_pred"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode,cls_matters", [(0, True), (1, False), (3, False)])
def test_decoder_cls_kept_only_in_mode_0(mode, cls_matters):
  model = _tiny_decoder(mode)
  x, ids_restore, _ = _encoder_output()
  variables = model.init(jax.random.key(0), x, ids_restore)
  out = model.apply(variables, x, ids_restore)
  out_new_cls = model.apply(variables, x.at[:, 0].add(1.0), ids_restore)
  assert out.shape == (2, 64, 12)
  assert (not np.allclose(out, out_new_cls)) == cls_matters


def test_invalid_mode_and_grid_raise():
  x, ids_restore, _ = _encoder_output()
  with pytest.raises(ValueError, match="mode"):
    _tiny_decoder(4).init(jax.random.key(0), x, ids_restore)
  block = dec.SwinBlock(HEADS, (6, 8))
  with pytest.raises(ValueError, match="not grid \\(6, 8\\) divisible by window"):
    block.init(jax.random.key(0), jnp.zeros((1, 3, 16, WIDTH)))
  model = dec.Decoder(grid=(6, 8), num_tokens=12, width=WIDTH, depth=2, num_heads=HEADS)
  x, ids_restore, _ = _encoder_output(length=48)
  with pytest.raises(ValueError, match="decoder grid \\(6, 8\\) is not divisible"):
    model.init(jax.random.key(0), x, ids_restore)


def test_decoder_from_config_demo_shape_and_bfloat16():
  cfg = audio.get_config("demo").model
  cfg.dtype = "bfloat16"
  num_tokens = cfg.quantizer.num_codebooks * cfg.quantizer.codebook_size * cfg.quantizer.soft_code
  model = dec.decoder_from_config(cfg, (8, 8), num_tokens)
  assert (model.mode, model.depth, model.num_heads, model.shift) == (1, 2, 4, 2)
  x, ids_restore, _ = _encoder_output(width=cfg.width, kept=12)
  variables = model.init(jax.random.key(0), x, ids_restore)
  out = model.apply(variables, x, ids_restore, deterministic=False,
                    rngs={"dropout": jax.random.key(1)})
  assert out.shape == (2, 64, num_tokens) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  # The logits keep the matmul's float32 accumulator rather than a bf16 rounding of it.
  out = np.asarray(out)
  assert (out != out.astype(jnp.bfloat16).astype(np.float32)).mean() > 0.5


def _abstract_params(model, enc_width, length, kept):
  x = jax.ShapeDtypeStruct((1, 1 + kept, enc_width), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, ids)["params"]


def _numel(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(tree)))


def _swin_shifts(model, enc_width, length, kept):
  """Abstract init; returns the parameters and the `shift` of each SwinBlock called."""
  shifts = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, dec.SwinBlock) and context.method_name == "__call__":
      shifts.append(context.module.shift)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    params = _abstract_params(model, enc_width, length, kept)
  return params, shifts


def test_audio_vit_b_decoder_parameter_count_and_shifts():
  cfg = audio.get_config().model
  q = cfg.quantizer
  model = dec.decoder_from_config(cfg, (64, 8), q.num_codebooks * q.codebook_size * q.soft_code)
  params, shifts = _swin_shifts(model, cfg.width, 512, 102)
  assert shifts == [0, 2] * 8
  blocks = [params[f"decoder_blocks_{i}"] for i in range(16)]
  assert "decoder_blocks_16" not in params
  assert [_numel(b) for b in blocks] == [3_159_712] * 16
  assert _numel(blocks) == 50_555_392
  assert _numel(params["decoder_pred"]) == 525_312
  pos_numel = 513 * 512  # fixed decoder_pos_embed: a constant here, a Parameter in PyTorch
  assert pos_numel == 262_656
  assert _numel(params) + pos_numel == 51_738_624

  cfg.decoder.no_shift = True
  model = dec.decoder_from_config(cfg, (64, 8), 1024)
  assert _swin_shifts(model, cfg.width, 512, 102)[1] == [0] * 16


@pytest.mark.parametrize("mode", [0, 1])
def test_every_parameter_has_logical_axes(mode):
  params = _abstract_params(_tiny_decoder(mode), 24, 64, 5)
  leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
