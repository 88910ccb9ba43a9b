"""BRIDLE losses as pure functions (reference `model/bridle.py`), all computed in float32."""
import jax
import jax.numpy as jnp

_COS_EPS = 1e-8  # the eps of torch.nn.functional.cosine_similarity


def encoder_loss(logits: jax.Array, codes: jax.Array, mask: jax.Array,
                 num_codebooks: int, codebook_size: int):
  """Masked token prediction: cross-entropy of the head's logits against tokenizer codes.

  Args:
    logits: (B, N, C * K), per patch C consecutive chunks of K logits.
    codes: (B, N, C) int targets, C = num_codebooks * soft_code in stage-major order;
      chunk j is scored against code j.
    mask: (B, N), 1 (or True) where the patch was masked; only those positions count.
    num_codebooks: S; the soft-code chunks of a codebook are averaged in its metrics.
    codebook_size: K.

  Returns:
    (loss, metrics): loss is the mean CE over all masked (patch, chunk) pairs, which is
    the reference's single `CrossEntropyLoss` and equals the mean of the per-codebook
    CEs; metrics holds `ce_per_codebook` and `acc_per_codebook`, each (S,).
  """
  chunks = codes.shape[-1]
  if chunks % num_codebooks:
    raise ValueError(f"encoder_loss: {chunks} codes per patch is not a multiple of "
                     f"num_codebooks = {num_codebooks}")
  if logits.shape[-1] != chunks * codebook_size:
    raise ValueError(f"encoder_loss: logits width {logits.shape[-1]} != {chunks} codes "
                     f"x codebook_size {codebook_size}")
  logits = logits.astype(jnp.float32).reshape(*codes.shape, codebook_size)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  targets = codes.astype(jnp.int32)[..., None]
  ce = -jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == codes).astype(jnp.float32)
  weight = mask.astype(jnp.float32)[..., None]
  num_masked = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
  ce_per_chunk = jnp.sum(ce * weight, axis=(0, 1)) / num_masked
  acc_per_chunk = jnp.sum(correct * weight, axis=(0, 1)) / num_masked
  metrics = {
      "ce_per_codebook": ce_per_chunk.reshape(num_codebooks, -1).mean(axis=-1),
      "acc_per_codebook": acc_per_chunk.reshape(num_codebooks, -1).mean(axis=-1),
  }
  return ce_per_chunk.mean(), metrics


def cosine_loss(pred: jax.Array, teacher: jax.Array) -> jax.Array:
  """Mean over tokens of 1 - cos(pred, teacher); pred and teacher are (B, N, C).

  A teacher with exactly one more token than pred (the encoder's CLS) loses its first
  token, as in the reference. Norms are clamped at 1e-8 like torch's cosine_similarity.
  """
  if teacher.shape[-2] == pred.shape[-2] + 1:
    teacher = teacher[..., 1:, :]
  if teacher.shape != pred.shape:
    raise ValueError(f"cosine_loss: teacher shape {teacher.shape} does not match "
                     f"prediction shape {pred.shape}")
  pred = pred.astype(jnp.float32)
  teacher = teacher.astype(jnp.float32)
  dot = jnp.sum(pred * teacher, axis=-1)
  return jnp.mean(1.0 - dot / (_clamped_norm(pred) * _clamped_norm(teacher)))


def _clamped_norm(x: jax.Array) -> jax.Array:
  """max(|x|, 1e-8) along the last axis, with a finite gradient at 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), _COS_EPS ** 2))


def tokenizer_loss(pred: jax.Array, teacher: jax.Array,
                   codebook_loss: jax.Array) -> jax.Array:
  """L_tok = cosine loss + codebook loss, unweighted (the commitment weight is inside)."""
  return cosine_loss(pred, teacher) + codebook_loss.astype(jnp.float32)


def joint_loss(enc_loss: jax.Array, tok_loss: jax.Array, ratio: float) -> jax.Array:
  """Joint-phase loss: encoder loss + ratio * tokenizer loss."""
  return enc_loss + ratio * tok_loss
