"""Fast linear probe: L2-regularised logistic regression on frozen embeddings, in JAX.

A quick check of what an encoder's mean-pooled embeddings hold: features are standardised
with the training set's mean and std, then a linear layer is fitted full-batch with L-BFGS
(softmax cross-entropy for single-label data, per-class sigmoid cross-entropy for
multi-label), a fixed number of iterations, deterministically. No scikit-learn needed.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bridle_jax.evaluate import metrics

DEFAULT_L2 = 1e-3
DEFAULT_STEPS = 300


@dataclasses.dataclass(frozen=True)
class LinearProbe:
  """A fitted probe: standardisation statistics and the linear layer."""
  mean: np.ndarray     # (D,)
  std: np.ndarray      # (D,)
  weights: np.ndarray  # (D, C)
  bias: np.ndarray     # (C,)
  multi_label: bool

  def scores(self, features) -> np.ndarray:
    """(N, C) logits of (N, D) features."""
    standardised = (np.asarray(features, np.float32) - self.mean) / self.std
    return standardised @ self.weights + self.bias


def _loss(params, x, y, l2, multi_label):
  logits = x @ params["w"] + params["b"]
  if multi_label:
    data_loss = optax.sigmoid_binary_cross_entropy(logits, y).mean()
  else:
    targets = y / jnp.maximum(y.sum(-1, keepdims=True), 1.0)
    data_loss = optax.softmax_cross_entropy(logits, targets).mean()
  return data_loss + 0.5 * l2 * jnp.sum(params["w"] ** 2)


@functools.partial(jax.jit, static_argnames=("multi_label", "steps"))
def _fit_lbfgs(x, y, l2, *, multi_label: bool, steps: int):
  """`steps` L-BFGS iterations from zero weights; returns (params, loss per iteration)."""
  loss_fn = functools.partial(_loss, x=x, y=y, l2=l2, multi_label=multi_label)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss_fn)

  def iteration(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=loss_fn)
    return (optax.apply_updates(params, updates), state), value

  params = {"w": jnp.zeros((x.shape[1], y.shape[1]), jnp.float32),
            "b": jnp.zeros((y.shape[1],), jnp.float32)}
  (params, _), losses = jax.lax.scan(iteration, (params, solver.init(params)), length=steps)
  return params, losses


def fit(features, labels, *, multi_label: bool, l2: float = DEFAULT_L2,
        steps: int = DEFAULT_STEPS) -> LinearProbe:
  """Fits a probe to (N, D) features and (N, C) multi-hot labels."""
  features = np.asarray(features, np.float32)
  labels = np.asarray(labels, np.float32)
  if features.ndim != 2 or labels.ndim != 2 or len(features) != len(labels):
    raise ValueError(f"features {features.shape} and labels {labels.shape}: expected (N, D) "
                     "and (N, C)")
  if not np.isfinite(features).all():
    raise ValueError("features hold NaN or Inf rows; drop failed clips first")
  mean = features.mean(0)
  std = np.maximum(features.std(0), 1e-6)
  params, _ = _fit_lbfgs(jnp.asarray((features - mean) / std), jnp.asarray(labels),
                         jnp.float32(l2), multi_label=multi_label, steps=steps)
  return LinearProbe(mean=mean, std=std, weights=np.asarray(params["w"]),
                     bias=np.asarray(params["b"]), multi_label=multi_label)


def fit_and_evaluate(train_features, train_labels, test_features, test_labels, *,
                     multi_label: bool, l2: float = DEFAULT_L2,
                     steps: int = DEFAULT_STEPS) -> dict:
  """Fits on the training rows and returns `metrics.classification_metrics` on the test rows.

  Rows whose features are not finite (clips that could not be read) are left out of both.
  """
  train_ok = np.isfinite(train_features).all(1)
  test_ok = np.isfinite(test_features).all(1)
  probe = fit(np.asarray(train_features)[train_ok], np.asarray(train_labels)[train_ok],
              multi_label=multi_label, l2=l2, steps=steps)
  return metrics.classification_metrics(probe.scores(np.asarray(test_features)[test_ok]),
                                        np.asarray(test_labels)[test_ok])
