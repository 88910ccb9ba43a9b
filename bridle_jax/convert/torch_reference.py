"""PyTorch BRIDLE models (audio, and images through the same modules with 3 input channels)
with the official module and parameter names.

Written for this project from the behaviour description of the official code
(official_impl.md §2, §3, §4.1, §6.1), to check the converter: the state dicts of `to_torch`
load into `BRIDLE` and `FineTuneViT` with strict=True, and their forward passes reproduce
ours. Inference only: the quantizer is the official nearest-code search (no EMA, k-means or
dead-code restart); the Swin meta-MLP dropout is active in train mode, so call `.eval()` to
compare outputs. Inputs follow the official layout, (B, C, time, freq) or (B, 3, H, W).

Importing this module needs torch (`pip install 'bridle_jax[torch]'`).
"""
import torch
import torch.nn.functional as F
from torch import nn

from bridle_jax.data import inputs

VIT_LN_EPS = 1e-6
SWIN_LN_EPS = 1e-5
META_MLP_HIDDEN = 384
SHIFT_MASK_VALUE = -100.0


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
  """[sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim/2)), in float64."""
  omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
  angles = positions.to(torch.float64)[:, None] * omega[None, :]
  return torch.cat([angles.sin(), angles.cos()], dim=1)


def audio_pos_embed(grid_t: int, grid_f: int, dim: int, cls: bool = True) -> torch.Tensor:
  """(1, [1 +] grid_t * grid_f, dim) official audio table (§2.2).

  The official helper gets the grid as (freq, time) patches, so token k's first half
  encodes k mod grid_t and its second half k // grid_t. The CLS row is zero.
  """
  k = torch.arange(grid_t * grid_f)
  table = torch.cat([_sincos_1d(k % grid_t, dim // 2), _sincos_1d(k // grid_t, dim // 2)], 1)
  if cls:
    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])
  return table.float()[None]


def _frozen(table: torch.Tensor) -> nn.Parameter:
  return nn.Parameter(table, requires_grad=False)


class PatchEmbed(nn.Module):
  """Conv2d patches: (B, C, T, F) -> (B, L, width), token k = (F / p) * t + f."""

  def __init__(self, in_chans: int, width: int, patch: int):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, width, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
  """timm multi-head attention: fused qkv rows [q | k | v], each head-major."""

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    b, n, c = x.shape
    head_dim = c // self.num_heads
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    out = attn.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  """timm pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); LayerNorm eps 1e-6."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=VIT_LN_EPS)
    self.attn = Attention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=VIT_LN_EPS)
    self.mlp = Mlp(width, int(width * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def window_partition(x, window):
  """(B, T, F, C) -> (B * windows, wt * wf, C); window (F / wf) * (t // wt) + f // wf,
  in-window index wf * (t mod wt) + (f mod wf)."""
  b, t, f, c = x.shape
  wt, wf = window
  x = x.reshape(b, t // wt, wt, f // wf, wf, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, wt * wf, c)


def window_reverse(windows, window, grid):
  """Inverse of `window_partition`: (B * windows, n, C) -> (B, T, F, C)."""
  (t, f), (wt, wf) = grid, window
  c = windows.shape[-1]
  x = windows.reshape(-1, t // wt, f // wf, wt, wf, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, t, f, c)


def relative_coordinates_log(window) -> torch.Tensor:
  """(n * n, 2): sign(d) ln(1 + |d|) of d = pos_a - pos_b, row a * n + b."""
  i, j = torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")
  coords = torch.stack([i.flatten(), j.flatten()], dim=1)
  delta = (coords[:, None, :] - coords[None, :, :]).reshape(-1, 2).float()
  return torch.sign(delta) * torch.log1p(delta.abs())


def shift_mask(grid, window, shift: int) -> torch.Tensor:
  """(windows, n, n): -100 between tokens of different time regions of the rolled grid,
  rows [0, T - wt), [T - wt, T - shift), [T - shift, T); 0 elsewhere."""
  t, f = grid
  region = torch.zeros(1, t, f, 1)
  region[:, t - window[0]:t - shift] = 1
  region[:, t - shift:] = 2
  labels = window_partition(region, window)[..., 0]
  return (labels[:, :, None] != labels[:, None, :]).float() * SHIFT_MASK_VALUE


class MetaMlp(nn.Module):
  """Continuous position bias: Linear 2 -> 384, ReLU, Dropout, Linear 384 -> heads."""

  def __init__(self, num_heads: int, dropout: float):
    super().__init__()
    self.model = nn.Sequential(nn.Linear(2, META_MLP_HIDDEN), nn.ReLU(), nn.Dropout(dropout),
                               nn.Linear(META_MLP_HIDDEN, num_heads))

  def forward(self, x):
    return self.model(x)


class WindowAttention(nn.Module):
  """Scaled cosine attention per window with a meta-MLP relative position bias."""

  def __init__(self, width: int, num_heads: int, window, dropout: float):
    super().__init__()
    self.num_heads = num_heads
    self.tau = nn.Parameter(torch.ones(num_heads))
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)
    self.meta_mlp = MetaMlp(num_heads, dropout)
    self.register_buffer("relative_coordinates_log", relative_coordinates_log(window),
                         persistent=False)

  def forward(self, x, mask=None):
    """x: (B * windows, n, C); mask: (windows, n, n) or None."""
    bw, n, c = x.shape
    heads = self.num_heads
    q, k, v = self.qkv(x).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    norms = q.norm(dim=-1)[..., :, None] * k.norm(dim=-1)[..., None, :]
    attn = (q @ k.transpose(-2, -1)) / norms.clamp(min=1e-6)
    attn = attn / self.tau.clamp(min=0.01)[None, :, None, None]
    bias = self.meta_mlp(self.relative_coordinates_log).transpose(0, 1).reshape(heads, n, n)
    attn = attn + bias[None]
    if mask is not None:
      windows = mask.shape[0]
      attn = (attn.reshape(bw // windows, windows, heads, n, n) + mask[None, :, None])
      attn = attn.reshape(bw, heads, n, n)
    out = attn.softmax(dim=-1) @ v
    return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinMlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.model = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

  def forward(self, x):
    return self.model(x)


class SwinBlock(nn.Module):
  """Post-norm Swin block on the (T, F) grid; `shift` rolls time only; LayerNorm eps 1e-5."""

  def __init__(self, width: int, num_heads: int, grid, window, shift: int, mlp_ratio: float,
               dropout: float):
    super().__init__()
    self.grid, self.window, self.shift = tuple(grid), tuple(window), shift
    self.attn = WindowAttention(width, num_heads, window, dropout)
    self.norm1 = nn.LayerNorm(width, eps=SWIN_LN_EPS)
    self.mlp = SwinMlp(width, int(width * mlp_ratio))
    self.norm2 = nn.LayerNorm(width, eps=SWIN_LN_EPS)
    self.register_buffer("attn_mask", shift_mask(grid, window, shift) if shift else None,
                         persistent=False)

  def forward(self, x):
    b, length, c = x.shape
    h = x.reshape(b, *self.grid, c)
    if self.shift:
      h = torch.roll(h, shifts=(-self.shift, 0), dims=(1, 2))
    h = self.attn(window_partition(h, self.window), self.attn_mask)
    h = window_reverse(h, self.window, self.grid)
    if self.shift:
      h = torch.roll(h, shifts=(self.shift, 0), dims=(1, 2))
    x = x + self.norm1(h.reshape(b, length, c))
    return x + self.norm2(self.mlp(x))


class ViTTrunk(nn.Module):
  """cls_token, frozen pos_embed, patch_embed, blocks and (with `final_norm`) norm."""

  def __init__(self, grid, in_chans: int, patch: int, width: int, depth: int, num_heads: int,
               mlp_ratio: float, final_norm: bool = True):
    super().__init__()
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.pos_embed = _frozen(audio_pos_embed(*grid, width))
    self.patch_embed = PatchEmbed(in_chans, width, patch)
    self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(depth))
    if final_norm:
      self.norm = nn.LayerNorm(width, eps=VIT_LN_EPS)

  def embed(self, x):
    return self.patch_embed(x) + self.pos_embed[:, 1:]

  def run_blocks(self, tokens):
    """Prepends CLS (plus its zero pos row) and runs the blocks."""
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls, tokens], dim=1)
    for block in self.blocks:
      x = block(x)
    return x


class EncoderDecoder(ViTTrunk):
  """`MaskedAutoencoderViT`: encoder E and decoder D (§2)."""

  def __init__(self, grid, in_chans: int, patch: int, width: int, depth: int, num_heads: int,
               mlp_ratio: float, num_tokens: int, decoder_mode: int = 1,
               decoder_width: int = 512, decoder_depth: int = 16, decoder_heads: int = 16,
               window=(4, 4), shift: int = 2, no_shift: bool = False,
               meta_mlp_dropout: float = 0.1):
    super().__init__(grid, in_chans, patch, width, depth, num_heads, mlp_ratio)
    self.decoder_mode = decoder_mode
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_width))
    self.decoder_pos_embed = _frozen(audio_pos_embed(*grid, decoder_width))
    self.decoder_embed = nn.Linear(width, decoder_width)
    if decoder_mode == 1:
      blocks = [SwinBlock(decoder_width, decoder_heads, grid, window,
                          shift if i % 2 and not no_shift else 0, mlp_ratio, meta_mlp_dropout)
                for i in range(decoder_depth)]
    else:
      blocks = [Block(decoder_width, decoder_heads, mlp_ratio) for _ in range(decoder_depth)]
    self.decoder_blocks = nn.ModuleList(blocks)
    self.decoder_norm = nn.LayerNorm(decoder_width, eps=VIT_LN_EPS)
    self.decoder_pred = nn.Linear(decoder_width, num_tokens)

  @staticmethod
  def random_masking(x, mask_ratio: float):
    """Keeps int(L (1 - ratio)) tokens in ascending-noise order; mask 1 = removed."""
    b, length, width = x.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.rand(b, length, device=x.device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    kept = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, width))
    mask = torch.ones(b, length, device=x.device)
    mask[:, :keep] = 0
    return kept, mask.gather(1, ids_restore), ids_restore

  def forward_encoder(self, x, mask_ratio: float):
    tokens, mask, ids_restore = self.random_masking(self.embed(x), mask_ratio)
    return self.norm(self.run_blocks(tokens)), mask, ids_restore

  def forward_encoder_no_mask(self, x):
    """(B, 1 + L, width) features of the unmasked input."""
    return self.norm(self.run_blocks(self.embed(x)))

  def forward_decoder(self, x, ids_restore):
    """[CLS, kept tokens] -> logits (B, L, num_tokens) for every patch."""
    x = self.decoder_embed(x)
    b, length = ids_restore.shape
    fill = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
    patches = torch.cat([x[:, 1:], fill], dim=1)
    patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
    if self.decoder_mode != 0:
      x = x[:, 1:]
    for block in self.decoder_blocks:
      x = block(x)
    x = self.decoder_pred(self.decoder_norm(x))
    return x[:, 1:] if self.decoder_mode == 0 else x

  def forward(self, x, mask_ratio: float = 0.8):
    latent, mask, ids_restore = self.forward_encoder(x, mask_ratio)
    return self.forward_decoder(latent, ids_restore), mask


class VQEmbedding(nn.Embedding):
  """One codebook: K + 1 rows, row K the unused padding row; EMA buffers."""

  def __init__(self, num_codes: int, dim: int, kmeans_init: bool):
    super().__init__(num_codes + 1, dim, padding_idx=num_codes)
    self.register_buffer("cluster_size_ema", torch.zeros(num_codes))
    self.register_buffer("embed_ema", self.weight[:-1].detach().clone())
    if kmeans_init:
      self.register_buffer("initted", torch.zeros(1))

  def nearest(self, residual):
    """Index of the nearest code row (padding row excluded) to l2normalize(residual)."""
    u = F.normalize(residual, dim=-1)
    codes = self.weight[:-1]
    distances = ((u * u).sum(-1, keepdim=True) + (codes * codes).sum(-1)[None]
                 - 2.0 * u @ codes.T)
    return distances.argmin(dim=-1)


class RQBottleneck(nn.Module):
  """Residual quantizer: each stage codes the residual left by the previous ones."""

  def __init__(self, num_codebooks: int, num_codes: int, dim: int, kmeans_init: bool):
    super().__init__()
    self.codebooks = nn.ModuleList(VQEmbedding(num_codes, dim, kmeans_init)
                                   for _ in range(num_codebooks))

  def forward(self, z):
    """z (B, L, D) -> (z_q straight-through of the summed code rows, codes (B, L, S))."""
    residual = z.reshape(-1, z.shape[-1])
    quantized = torch.zeros_like(residual)
    codes = []
    for codebook in self.codebooks:
      idx = codebook.nearest(residual)
      rows = F.embedding(idx, codebook.weight)
      residual = residual - rows
      quantized = quantized + rows
      codes.append(idx)
    z_q = z + (quantized.reshape(z.shape) - z).detach()
    return z_q, torch.stack(codes, dim=-1).reshape(*z.shape[:-1], len(codes))


class Tokenizer(ViTTrunk):
  """`BRIDLETokenizer`: tokenizer T, quantizer and estimator TE (§3)."""

  def __init__(self, grid, in_chans: int, patch: int, width: int, depth: int, num_heads: int,
               mlp_ratio: float, code_dim: int, num_codebooks: int, num_codes: int,
               kmeans_init: bool, estimator_depth: int, teacher_width: int):
    super().__init__(grid, in_chans, patch, width, depth, num_heads, mlp_ratio)
    self.estimator_pos_embed = _frozen(audio_pos_embed(*grid, width, cls=False))
    self.cold_start_encoder = nn.Linear(width, code_dim, bias=False)
    self.quantize_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(),
                                        nn.Linear(width, code_dim))
    self.quantizer = RQBottleneck(num_codebooks, num_codes, code_dim, kmeans_init)
    self.estimator_embed = nn.Linear(code_dim, width)
    self.estimator_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio)
                                          for _ in range(estimator_depth))
    self.estimator_norm = nn.LayerNorm(width, eps=VIT_LN_EPS)
    self.estimator_pred = nn.Linear(width, teacher_width)

  def encode(self, x, cold_start: bool = False):
    """Pre-quantisation z (B, L, code_dim) of the unmasked input."""
    tokens = self.embed(x)
    if cold_start:
      return self.cold_start_encoder(tokens)
    return self.quantize_layer(self.norm(self.run_blocks(tokens))[:, 1:])

  def forward(self, x, cold_start: bool = False):
    """-> (z_q (B, L, code_dim), codes (B, L, S))."""
    return self.quantizer(self.encode(x, cold_start))

  def forward_estimator(self, z_q):
    """TE: z_q -> prediction of the teacher's patch features (B, L, teacher_width)."""
    x = self.estimator_embed(z_q) + self.estimator_pos_embed
    for block in self.estimator_blocks:
      x = block(x)
    return self.estimator_pred(self.estimator_norm(x))


class BRIDLE(nn.Module):
  """The pretraining model whose state dict is official_impl.md Appendix A."""

  def __init__(self, encoder_decoder: EncoderDecoder, tokenizer: Tokenizer):
    super().__init__()
    self.encoder_decoder = encoder_decoder
    self.tokenizer = tokenizer


class FineTuneViT(ViTTrunk):
  """Fine-tuning ViT (§6.1, Appendix B): mean of the patch tokens -> fc_norm -> head."""

  def __init__(self, grid, in_chans: int, patch: int, width: int, depth: int, num_heads: int,
               mlp_ratio: float, num_classes: int):
    super().__init__(grid, in_chans, patch, width, depth, num_heads, mlp_ratio,
                     final_norm=False)
    self.fc_norm = nn.LayerNorm(width, eps=VIT_LN_EPS)
    self.head = nn.Linear(width, num_classes)

  def forward_features(self, x):
    return self.fc_norm(self.run_blocks(self.embed(x))[:, 1:].mean(dim=1))

  def forward(self, x):
    return self.head(self.forward_features(x))


def _trunk_args(config) -> dict:
  m = config.model
  patch = m.patch_size
  return dict(grid=inputs.patch_grid(config.data, patch),
              in_chans=m.in_chans, patch=patch, width=m.width, depth=m.depth,
              num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)


def pretrain_model(config) -> BRIDLE:
  """`BRIDLE` sized by a bridle_jax config (rq quantizer)."""
  m, q, dec = config.model, config.model.quantizer, config.model.decoder
  args = _trunk_args(config)
  encoder_decoder = EncoderDecoder(
      **args, num_tokens=q.codebook_size * q.num_codebooks * q.soft_code,
      decoder_mode=dec.mode, decoder_width=dec.width, decoder_depth=dec.depth,
      decoder_heads=dec.num_heads, window=tuple(dec.window), shift=dec.shift,
      no_shift=dec.no_shift, meta_mlp_dropout=dec.meta_mlp_dropout)
  tokenizer = Tokenizer(
      **args, code_dim=q.code_dim, num_codebooks=q.num_codebooks, num_codes=q.codebook_size,
      kmeans_init=q.kmeans_init, estimator_depth=m.tokenizer.estimator_depth,
      teacher_width=m.width)
  return BRIDLE(encoder_decoder, tokenizer)


def finetune_model(config, num_classes: int = 527) -> FineTuneViT:
  """`FineTuneViT` with the encoder of a bridle_jax config."""
  return FineTuneViT(**_trunk_args(config), num_classes=num_classes)
