"""train/tasks/glue/metrics.py: each task's GLUE metrics on small hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest

from train.tasks.glue import metrics as glue_metrics


def one_hot_logits(preds, n=2):
  return np.eye(n)[np.asarray(preds)]


def test_accuracy_tasks():
  for task in ("sst2", "qnli", "rte", "wnli", "mnli"):
    got = glue_metrics.compute(task, one_hot_logits([1, 0, 1, 1]), np.array([1, 0, 0, 1]))
    assert got == {"accuracy": 0.75}


def test_f1_tasks():
  # tp=1, fp=1, fn=1 -> f1 = 0.5; accuracy 2/4
  got = glue_metrics.compute("mrpc", one_hot_logits([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
  assert got == pytest.approx({"accuracy": 0.5, "f1": 0.5, "combined_score": 0.5})
  assert set(glue_metrics.compute("qqp", one_hot_logits([1, 0]), np.array([1, 0]))) == {
    "accuracy",
    "f1",
    "combined_score",
  }


def test_cola_matthews():
  perfect = glue_metrics.compute("cola", one_hot_logits([1, 0, 1, 0]), np.array([1, 0, 1, 0]))
  inverted = glue_metrics.compute("cola", one_hot_logits([0, 1, 0, 1]), np.array([1, 0, 1, 0]))
  assert perfect == {"matthews_correlation": 1.0}
  assert inverted == {"matthews_correlation": -1.0}


def test_stsb_correlations():
  labels = np.array([0.0, 1.0, 2.0, 3.0])
  got = glue_metrics.compute("stsb", np.array([[0.0], [1.0], [4.0], [9.0]]), labels)
  assert got["spearmanr"] == pytest.approx(1.0)  # monotone
  assert 0.9 < got["pearson"] < 1.0  # but not linear
  assert got["combined_score"] == pytest.approx((got["pearson"] + got["spearmanr"]) / 2)


def test_predictions_and_main_metric():
  np.testing.assert_array_equal(glue_metrics.predictions([[0.2, 0.8], [3, 1]], False), [1, 0])
  np.testing.assert_array_equal(glue_metrics.predictions([[0.5], [2.5]], True), [0.5, 2.5])
  assert glue_metrics.main_metric("cola") == "matthews_correlation"
  assert glue_metrics.main_metric("stsb") == "combined_score"
  assert glue_metrics.main_metric("sst2") == "accuracy"
