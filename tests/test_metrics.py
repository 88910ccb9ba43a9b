"""Downstream metrics against hand-computed values and scikit-learn; k-fold splits."""
import numpy as np
import pytest

from bridle_jax.evaluate import metrics


def test_average_precision_by_hand():
  # Ranks: + - + -  ->  precision 1/1 at recall 1/2, 2/3 at recall 1.
  assert metrics.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(
      0.5 * 1 + 0.5 * 2 / 3)


def test_average_precision_treats_tied_scores_as_one_threshold():
  # Thresholds 0.9: P 0, R 0; 0.5 (three clips, two positive): P 2/4, R 2/3; 0.2: P 3/5, R 1.
  labels, scores = [1, 0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9, 0.5]
  assert metrics.average_precision(labels, scores) == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 0.6)
  assert np.isnan(metrics.average_precision([0, 0], [0.3, 0.1]))


def test_infinite_scores_that_tie_form_one_threshold():
  # inf, inf (one positive, one negative) tie: P 1/2 at R 1/2, then 2/3 at R 1.
  assert metrics.average_precision([1, 0, 1, 0], [np.inf, np.inf, 0.5, 0.1]) == pytest.approx(
      0.5 * 0.5 + 0.5 * 2 / 3)


def test_non_finite_scores_give_nan_metrics_and_are_counted():
  """A diverged classifier's NaN logits must not score like a real one (argmax of NaN rows
  is class 0, and NaN sorts in index order)."""
  labels = np.eye(3)[[0, 0, 0, 1, 2]]
  scores = np.full((5, 3), np.nan)
  scores[4] = [0.1, 0.2, 0.7]
  result = metrics.classification_metrics(scores, labels)
  assert result["nonfinite_clips"] == 4 and result["num_clips"] == 5
  assert all(np.isnan(result[k]) for k in ("accuracy", "mAP", "mAUC", "d_prime"))
  assert metrics.classification_metrics(labels + 0.5, labels)["nonfinite_clips"] == 0


def test_roc_auc_and_d_prime_by_hand():
  # Positive-negative pairs ordered correctly: (0.9, 0.8), (0.9, 0.1), (0.7, 0.1); not (0.7, 0.8).
  assert metrics.roc_auc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.75)
  assert metrics.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
  assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))
  assert metrics.d_prime(0.5) == pytest.approx(0.0)
  assert metrics.d_prime(0.76024993890652326) == pytest.approx(1.0, abs=1e-6)  # Phi(1/sqrt 2)


def test_top1_accuracy_counts_any_label_of_the_clip():
  scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
  labels = np.array([[0, 1, 0], [0, 1, 0], [1, 0, 1], [1, 0, 0]])
  assert metrics.top1_accuracy(scores, labels) == pytest.approx(0.5)


def test_classification_metrics_skip_classes_without_positives():
  scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.6, 0.3, 0.2]])
  labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]])
  result = metrics.classification_metrics(scores, labels)
  assert result["mAP"] == pytest.approx(1.0)  # class 2 has no positive: left out, not 0
  assert result["mAUC"] == pytest.approx(1.0)
  assert result["accuracy"] == pytest.approx(1.0)
  assert result["num_clips"] == 3
  with pytest.raises(ValueError, match="must both be"):
    metrics.classification_metrics(scores, labels[:, :2])


def test_matches_scikit_learn_with_ties():
  sk = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  labels = (rng.random((200, 6)) < np.linspace(0.05, 0.5, 6)).astype(int)
  scores = np.round(rng.normal(size=(200, 6)) + labels, 1)  # rounding makes many ties
  for c in range(6):
    assert metrics.average_precision(labels[:, c], scores[:, c]) == pytest.approx(
        sk.average_precision_score(labels[:, c], scores[:, c]))
    assert metrics.roc_auc(labels[:, c], scores[:, c]) == pytest.approx(
        sk.roc_auc_score(labels[:, c], scores[:, c]))
  result = metrics.classification_metrics(scores, labels)
  assert result["mAP"] == pytest.approx(sk.average_precision_score(labels, scores, average="macro"))
  assert result["mAUC"] == pytest.approx(sk.roc_auc_score(labels, scores, average="macro"))


def test_kfold_splits_test_every_fold_once_on_disjoint_sets():
  folds = np.array([1, 2, 3, 1, 2, 3, 3, 5])
  splits = metrics.kfold_splits(folds)
  assert [fold for fold, _, _ in splits] == [1, 2, 3, 5]
  tested = np.concatenate([test for _, _, test in splits])
  assert sorted(tested) == list(range(len(folds)))  # each clip tested exactly once
  for fold, train, test in splits:
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test])) == list(range(len(folds)))
    assert (folds[test] == fold).all() and (folds[train] != fold).all()


@pytest.mark.parametrize("folds,message", [([1, 1, 1], "at least 2 folds"),
                                           ([1, -1, 2], "have no fold")])
def test_kfold_splits_refuse_unusable_folds(folds, message):
  with pytest.raises(ValueError, match=message):
    metrics.kfold_splits(folds)


def test_mean_over_runs_averages_metrics_and_sums_clip_counts():
  mean = metrics.mean_over_runs([
      {"accuracy": 0.5, "mAP": 0.2, "note": "a", "num_clips": 40, "skipped_clips": 1},
      {"accuracy": 0.7, "mAP": 0.4, "note": "b", "num_clips": 39, "skipped_clips": 0}])
  assert mean == pytest.approx({"accuracy": 0.6, "mAP": 0.3, "num_clips": 79,
                                "skipped_clips": 1})
  assert isinstance(mean["num_clips"], int)
