"""Downstream metrics on host arrays: AP / mAP, AUC / mAUC, d-prime, top-1 accuracy, k-fold.

Scores are any per-class scores (logits work: AP and AUC depend only on their order); labels
are multi-hot (a label counts as present when > 0). Per-class AP is sklearn's
`average_precision_score`: sum over distinct score thresholds of (R_n - R_{n-1}) P_n, tied scores
forming one threshold. AUC is the Mann-Whitney statistic with ties counted half, as sklearn's
`roc_auc_score`. A class without positives in the evaluated set has no AP (sklearn would give 0)
and one without positives or without negatives no AUC; mAP and mAUC average over the classes
that have them. Scores that are not finite (a diverged classifier) make every metric NaN.
"""
import math

import numpy as np
from scipy import special


def average_precision(labels, scores) -> float:
  """AP of one class; NaN when `labels` holds no positive."""
  positive = np.asarray(labels) > 0
  scores = np.asarray(scores, np.float64)
  if not positive.any():
    return float("nan")
  order = np.argsort(-scores, kind="stable")
  sorted_scores, hits = scores[order], positive[order]
  last_of_tie = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), len(scores) - 1]
  true_positives = np.cumsum(hits)[last_of_tie]
  precision = true_positives / (last_of_tie + 1)
  recall = true_positives / true_positives[-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def roc_auc(labels, scores) -> float:
  """Area under the ROC curve of one class; NaN without both positives and negatives."""
  positive = np.asarray(labels) > 0
  num_pos = int(positive.sum())
  num_neg = positive.size - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  _, group, group_size = np.unique(np.asarray(scores, np.float64), return_inverse=True,
                                   return_counts=True)
  ranks = (np.cumsum(group_size) - (group_size - 1) / 2)[group]  # ties share their mean rank
  return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def d_prime(auc: float) -> float:
  """sqrt(2) * Phi^-1(AUC): the d' of two unit-variance Gaussians with that AUC."""
  return float(np.sqrt(2.0) * special.ndtri(auc))


def top1_accuracy(scores, labels) -> float:
  """Fraction of clips whose highest-scoring class is one of their labels."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  best = np.argmax(scores, axis=1)
  return float(np.mean(labels[np.arange(len(best)), best] > 0))


def classification_metrics(scores, labels) -> dict:
  """accuracy, mAP, mAUC, d_prime, num_clips and nonfinite_clips (clips with a NaN or
  infinite score: when there are any, the metrics are NaN) of (N, C) scores against (N, C)
  labels."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.shape != labels.shape or scores.ndim != 2:
    raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, C)")
  nonfinite = int((~np.isfinite(scores)).any(axis=1).sum())
  if nonfinite:
    return {"accuracy": math.nan, "mAP": math.nan, "mAUC": math.nan, "d_prime": math.nan,
            "num_clips": int(len(labels)), "nonfinite_clips": nonfinite}
  per_class_ap = [average_precision(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
  per_class_auc = [roc_auc(labels[:, c], scores[:, c]) for c in range(labels.shape[1])]
  mean_ap = _nanmean(per_class_ap)
  mean_auc = _nanmean(per_class_auc)
  return {"accuracy": top1_accuracy(scores, labels), "mAP": mean_ap, "mAUC": mean_auc,
          "d_prime": d_prime(mean_auc), "num_clips": int(len(labels)), "nonfinite_clips": 0}


def _nanmean(values) -> float:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def kfold_splits(folds) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """(fold, train indices, test indices) per distinct fold value, in increasing fold order.

  Each fold is the test set once and the other folds are its training set (ESC-50: 5 folds,
  train on 4, test on 1). Every clip needs a fold (>= 0) and there must be two folds or more.
  """
  folds = np.asarray(folds)
  if folds.size and (folds < 0).any():
    missing = np.flatnonzero(folds < 0)
    raise ValueError(f"{missing.size} clips have no fold (first: index {missing[0]}); "
                     "k-fold evaluation needs a 'fold' on every manifest entry")
  values = np.unique(folds)
  if values.size < 2:
    raise ValueError(f"k-fold evaluation needs at least 2 folds, found {values.tolist()}")
  return [(int(fold), np.flatnonzero(folds != fold), np.flatnonzero(folds == fold))
          for fold in values]


COUNT_KEYS = ("num_clips", "nonfinite_clips", "skipped_clips")  # summed over runs


def mean_over_runs(results: list[dict]) -> dict:
  """Mean of each numeric metric present in every dict of `results`; clip counts
  (`COUNT_KEYS`: the folds' evaluation sets together) are summed."""
  keys = [k for k in results[0] if all(isinstance(r.get(k), (int, float)) for r in results)]
  return {key: (int(sum(r[key] for r in results)) if key in COUNT_KEYS else
                float(np.mean([r[key] for r in results]))) for key in keys}
