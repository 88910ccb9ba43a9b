"""Fixed sin-cos tables against the formulas of the reference notes (§2.2), token by token."""
import math

import numpy as np
import pytest

from bridle_jax.models import pos_embed
from bridle_jax.models.pos_embed import audio_pos_embed, image_pos_embed, sincos_1d


def sincos_direct(p, d):
  """[sin(p w_0..), cos(p w_0..)] with w_i = 10000^(-i / (d/2)), element by element."""
  sines = [math.sin(p * 10000 ** (-i / (d / 2))) for i in range(d // 2)]
  cosines = [math.cos(p * 10000 ** (-i / (d / 2))) for i in range(d // 2)]
  return np.array(sines + cosines)


def expected_table(num_tokens, dim, first, second):
  """Rows 1 + k = [sincos(first(k)), sincos(second(k))] with a zero CLS row 0."""
  rows = [np.zeros(dim)]
  for k in range(num_tokens):
    rows.append(np.concatenate([sincos_direct(first(k), dim // 2),
                                sincos_direct(second(k), dim // 2)]))
  return np.stack(rows)


def test_sincos_1d_sines_then_cosines():
  np.testing.assert_allclose(sincos_1d(np.array([3.0]), 8)[0], sincos_direct(3, 8), atol=1e-12)


def test_reference_order_vit_b_audio():
  table = audio_pos_embed(64, 8, 768, grid='reference')
  assert table.shape == (513, 768) and table.dtype == np.float32
  want = expected_table(512, 768, lambda k: k % 64, lambda k: k // 64)
  np.testing.assert_allclose(table, want, atol=1e-6)
  # The quirk: the first half is not the frequency index f = k mod 8.
  first_half_by_f = np.stack([sincos_direct(k % 8, 384) for k in range(512)])
  assert np.abs(table[1:, :384] - first_half_by_f).max() > 0.5


def test_time_freq_order_vit_b_audio():
  table = audio_pos_embed(64, 8, 768, grid='time_freq')
  want = expected_table(512, 768, lambda k: k % 8, lambda k: k // 8)
  np.testing.assert_allclose(table, want, atol=1e-6)


@pytest.mark.parametrize('grid, first, second', [
    ('reference', lambda k: k % 6, lambda k: k // 6),
    ('time_freq', lambda k: k % 4, lambda k: k // 4),
])
def test_small_audio_grid(grid, first, second):
  table = audio_pos_embed(6, 4, 16, grid=grid)
  np.testing.assert_allclose(table, expected_table(24, 16, first, second), atol=1e-6)


def test_decoder_width_table():
  table = audio_pos_embed(64, 8, 512)
  np.testing.assert_allclose(table, expected_table(512, 512, lambda k: k % 64, lambda k: k // 64),
                             atol=1e-6)


@pytest.mark.parametrize('rows, cols', [(14, 14), (3, 5)])
def test_image_grid_column_then_row(rows, cols):
  table = image_pos_embed(rows, cols, 32)
  want = expected_table(rows * cols, 32, lambda k: k % cols, lambda k: k // cols)
  np.testing.assert_allclose(table, want, atol=1e-6)


def test_cls_row_and_no_cls():
  with_cls = audio_pos_embed(64, 8, 768)
  assert not with_cls[0].any()
  without = audio_pos_embed(64, 8, 768, cls=False)
  assert without.shape == (512, 768)
  np.testing.assert_array_equal(without, with_cls[1:])


def test_unknown_grid_rejected():
  with pytest.raises(ValueError):
    audio_pos_embed(64, 8, 768, grid='freq_time')


@pytest.mark.parametrize("grid", ["reference", "time_freq"])
def test_shorter_clips_take_rows_of_the_pretraining_table(grid):
  full = pos_embed.audio_pos_embed(64, 8, 768, grid)  # (513, 768): CLS row, then 512 patches
  esc50 = pos_embed.audio_pos_embed(32, 8, 768, grid, table_t=64)
  np.testing.assert_array_equal(esc50, np.concatenate([full[:1], full[128:384]]))  # reference
  centred = pos_embed.audio_pos_embed(32, 8, 768, grid, table_t=64, crop="center")
  np.testing.assert_array_equal(centred, np.concatenate([full[:1], full[129:385]]))
  np.testing.assert_array_equal(pos_embed.audio_pos_embed(64, 8, 768, grid, table_t=64), full)
  longer = pos_embed.audio_pos_embed(128, 8, 768, grid, table_t=64)  # own grid's table
  np.testing.assert_array_equal(longer, pos_embed.audio_pos_embed(128, 8, 768, grid))
  with pytest.raises(ValueError, match="pos crop"):
    pos_embed.audio_pos_embed(32, 8, 768, grid, table_t=64, crop="prefix")
