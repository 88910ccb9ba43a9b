"""Fixed 2-D sin-cos positional embeddings (NumPy constants, not parameters).

Tokens are numbered row-major over the true (rows, cols) patch grid, k = cols * r + c.
`sincos_2d(rows, cols, dim)` is the MAE helper on that layout: dims [0, dim/2) encode the column
c = k mod cols, dims [dim/2, dim) the row r = k // cols.

Audio ('reference'): the reference passes the helper the grid swapped, (freq, time) patches, for a
(time, freq) token layout. Token k then gets column k mod grid_t and row k // grid_t, which are not
the patch's time/frequency indices (ViT-B audio: k mod 64 and k // 64 instead of f = k mod 8 and
t = k // 8). This is the default because pretrained checkpoints were trained with it.
Audio ('time_freq'): the MAE convention on the true (time, freq) grid, first half f = k mod grid_f,
second half t = k // grid_f. Images use the MAE convention on the true (rows, cols) grid.

Shorter clips than pretraining (ESC-50: 512 frames, 32 x 8 patches, after 1024-frame
pretraining) take a run of consecutive rows of the pretraining table (`table_t`), so that
the fixed encoding of a token is one the encoder was trained with. 'reference' (the
default) takes the rows the reference's ESC-50 loader keeps, 128..383 of a table whose
row 0 is CLS: the centred run, one token early. 'center' takes the centred run itself.
"""
import numpy as np


def sincos_1d(positions: np.ndarray, dim: int) -> np.ndarray:
  """(N,) positions -> (N, dim): [sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (dim/2))."""
  if dim % 2:
    raise ValueError(f'sin-cos dim must be even, got {dim}')
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(rows: int, cols: int, dim: int) -> np.ndarray:
  """(rows * cols, dim) table for row-major tokens: first half column, second half row."""
  if dim % 4:
    raise ValueError(f'2-D sin-cos dim must be a multiple of 4, got {dim}')
  k = np.arange(rows * cols)
  return np.concatenate([sincos_1d(k % cols, dim // 2), sincos_1d(k // cols, dim // 2)], axis=1)


def _with_cls(table: np.ndarray, cls: bool) -> np.ndarray:
  """Prepends an all-zero CLS row when `cls`; returns float32."""
  if cls:
    table = np.concatenate([np.zeros((1, table.shape[1])), table], axis=0)
  return table.astype(np.float32)


CROPS = ('reference', 'center')


def crop_start(tokens: int, table_tokens: int, crop: str = 'reference') -> int:
  """First token of the `table_tokens` table whose row a `tokens`-long sequence starts at."""
  if crop not in CROPS:
    raise ValueError(f"pos crop must be one of {CROPS}, got {crop!r}")
  start = (table_tokens - tokens) // 2
  return max(start - 1, 0) if crop == 'reference' else start


def audio_pos_embed(grid_t: int, grid_f: int, dim: int, grid: str = 'reference',
                    cls: bool = True, table_t: int = 0, crop: str = 'reference') -> np.ndarray:
  """((cls +) grid_t * grid_f, dim) table for tokens k = grid_f * t + f.

  grid: 'reference' reproduces the reference's swapped-grid quirk; 'time_freq' encodes the true
  frequency (first half) and time (second half) patch indices.
  table_t: when longer than grid_t, the rows come from the table of a (table_t, grid_f) grid
  (the pretraining clip length), starting at `crop_start`; otherwise the table is grid_t's.
  """
  rows_t = table_t if table_t > grid_t else grid_t
  if grid == 'reference':
    table = sincos_2d(grid_f, rows_t, dim)
  elif grid == 'time_freq':
    table = sincos_2d(rows_t, grid_f, dim)
  else:
    raise ValueError(f"pos grid must be 'reference' or 'time_freq', got {grid!r}")
  start = crop_start(grid_t * grid_f, rows_t * grid_f, crop) if rows_t > grid_t else 0
  return _with_cls(table[start:start + grid_t * grid_f], cls)


def image_pos_embed(grid_h: int, grid_w: int, dim: int, cls: bool = True) -> np.ndarray:
  """((cls +) grid_h * grid_w, dim) MAE table: first half column, second half row."""
  return _with_cls(sincos_2d(grid_h, grid_w, dim), cls)
