"""GLUE metrics per task, computed with scikit-learn and scipy (as the GLUE paper defines them).

==========  =========================================================
task        metrics
==========  =========================================================
cola        ``matthews_correlation``
sst2, mnli  ``accuracy`` (MNLI: matched; mismatched gets a ``_mm`` suffix)
qnli, rte   ``accuracy``
wnli        ``accuracy``
mrpc, qqp   ``accuracy``, ``f1``, ``combined_score`` (their mean)
stsb        ``pearson``, ``spearmanr``, ``combined_score`` (their mean)
==========  =========================================================

Example:
  >>> import numpy as np
  >>> compute("mrpc", np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1]))
  {'accuracy': 0.5, 'f1': 0.666..., 'combined_score': 0.583...}
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
  """Class indices (argmax), or the regression output itself."""
  logits = np.asarray(logits)
  return logits[:, 0] if regression else logits.argmax(-1)


def compute(task: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """The task's metrics from model outputs ``[N, num_labels]`` and labels ``[N]``."""
  labels = np.asarray(labels)
  if task == "stsb":
    preds = predictions(logits, True).astype(np.float64)
    pearson = float(stats.pearsonr(preds, labels)[0])
    spearman = float(stats.spearmanr(preds, labels)[0])
    return {"pearson": pearson, "spearmanr": spearman, "combined_score": (pearson + spearman) / 2}
  preds = predictions(logits, False)
  if task == "cola":
    return {"matthews_correlation": float(skm.matthews_corrcoef(labels, preds))}
  accuracy = float(skm.accuracy_score(labels, preds))
  if task in ("mrpc", "qqp"):
    f1 = float(skm.f1_score(labels, preds))
    return {"accuracy": accuracy, "f1": f1, "combined_score": (accuracy + f1) / 2}
  return {"accuracy": accuracy}


def main_metric(task: str) -> str:
  """The number to look at first (the GLUE leaderboard's)."""
  return {"cola": "matthews_correlation", "stsb": "combined_score"}.get(task, "accuracy")
