"""BRIDLE losses on small hand-made inputs with hand-computed values."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from bridle_jax.models import bridle

LOG3 = math.log(3.0)


def _encoder_inputs(dtype=jnp.float32):
  """B=1, N=2 patches, S=2 codebooks of K=2 codes; only patch 0 is masked.

  Patch 0: chunk 0 logits (0, log 3) -> p = (1/4, 3/4), target 1 -> CE -log(3/4), right;
           chunk 1 logits (0, 0) -> p = (1/2, 1/2), target 0 -> CE log 2, right (tie -> 0).
  Patch 1 is unmasked and has confidently wrong logits, so it must not count.
  """
  logits = jnp.asarray([[[0.0, LOG3, 0.0, 0.0],
                         [50.0, -50.0, -50.0, 50.0]]], dtype)
  codes = jnp.asarray([[[1, 0], [1, 0]]], jnp.int32)
  mask = jnp.asarray([[1, 0]], jnp.int32)
  return logits, codes, mask


def test_encoder_loss_counts_masked_positions_only():
  logits, codes, mask = _encoder_inputs(jnp.bfloat16)
  loss, metrics = bridle.encoder_loss(logits, codes, mask, num_codebooks=2,
                                      codebook_size=2)
  log3_bf16 = float(jnp.asarray(LOG3, jnp.bfloat16))  # 1.1015625
  ce0, ce1 = math.log1p(math.exp(log3_bf16)) - log3_bf16, math.log(2.0)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, (ce0 + ce1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["ce_per_codebook"], [ce0, ce1], rtol=1e-6)
  np.testing.assert_allclose(metrics["acc_per_codebook"], [1.0, 1.0])


def test_encoder_loss_with_all_masked_includes_wrong_patch():
  logits, codes, _ = _encoder_inputs()
  loss, metrics = bridle.encoder_loss(logits, codes,
                                      jnp.ones((1, 2), bool), 2, 2)
  ce0, ce1 = -math.log(0.75), math.log(2.0)
  np.testing.assert_allclose(metrics["ce_per_codebook"], [(ce0 + 100) / 2, (ce1 + 100) / 2],
                             rtol=1e-5)
  np.testing.assert_allclose(loss, (ce0 + ce1 + 200) / 4, rtol=1e-5)
  np.testing.assert_allclose(metrics["acc_per_codebook"], [0.5, 0.5])


def test_encoder_loss_soft_code_chunks_group_by_codebook():
  # S=1, soft_code=2: two chunks of K=2, both belonging to codebook 0.
  logits = jnp.asarray([[[0.0, LOG3, 0.0, 0.0]]])
  codes = jnp.asarray([[[1, 1]]])
  loss, metrics = bridle.encoder_loss(logits, codes, jnp.ones((1, 1)), 1, 2)
  expected = (-math.log(0.75) + math.log(2.0)) / 2
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["ce_per_codebook"], [expected], rtol=1e-6)
  np.testing.assert_allclose(metrics["acc_per_codebook"], [0.5])


def test_encoder_loss_rejects_mismatched_head():
  logits, codes, mask = _encoder_inputs()
  with pytest.raises(ValueError, match="codebook_size"):
    bridle.encoder_loss(logits, codes, mask, 2, 3)
  with pytest.raises(ValueError, match="num_codebooks"):
    bridle.encoder_loss(logits, codes, mask, 3, 2)


PRED = jnp.asarray([[[1.0, 0.0], [0.0, 2.0]]])
TEACHER = jnp.asarray([[[3.0, 0.0], [1.0, 1.0]]])
# cos = 1 and 1/sqrt(2): loss = mean(0, 1 - 1/sqrt(2)).
EXPECTED_COS = (1.0 - 1.0 / math.sqrt(2.0)) / 2


def test_cosine_loss_hand_computed():
  np.testing.assert_allclose(bridle.cosine_loss(PRED, TEACHER), EXPECTED_COS, rtol=1e-6)


def test_cosine_loss_drops_teacher_cls_token():
  with_cls = jnp.concatenate([jnp.asarray([[[-7.0, 5.0]]]), TEACHER], axis=1)
  np.testing.assert_allclose(bridle.cosine_loss(PRED, with_cls), EXPECTED_COS, rtol=1e-6)
  with pytest.raises(ValueError, match="teacher shape"):
    bridle.cosine_loss(PRED, jnp.concatenate([with_cls, TEACHER], axis=1))


def test_cosine_loss_zero_vector_is_finite():
  loss = bridle.cosine_loss(jnp.zeros((1, 1, 2)), jnp.ones((1, 1, 2)))
  np.testing.assert_allclose(loss, 1.0)


def test_tokenizer_and_joint_loss():
  tok = bridle.tokenizer_loss(PRED.astype(jnp.bfloat16), TEACHER, jnp.asarray(0.5))
  assert tok.dtype == jnp.float32
  np.testing.assert_allclose(tok, EXPECTED_COS + 0.5, rtol=1e-6)
  np.testing.assert_allclose(bridle.joint_loss(jnp.asarray(2.0), tok, 0.2),
                             2.0 + 0.2 * (EXPECTED_COS + 0.5), rtol=1e-6)
