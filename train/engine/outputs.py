"""What a run leaves in ``--output_dir`` besides checkpoints.

* ``metrics.jsonl``: one JSON object per line, training rows (``step``, ``loss``,
  ``learning_rate``, ``examples_per_s``, ``tokens_per_s``) and evaluation rows (``step`` and
  ``eval_*`` keys). A resumed run first drops the rows past the step it resumes from, so the
  file reads as one uninterrupted run.
* ``eval_results.json``: the final evaluation.
* ``curves.png``: training loss and evaluation metrics against the step (matplotlib, Agg).
* ``predict_results.tsv``: ``index<TAB>prediction`` for ``--do_predict``.

Whole files are written to a temporary sibling and renamed into place, so a crash leaves the old
file or the new one, never half of one. ``metrics.jsonl`` is appended to; a crash in the middle
of a row leaves a torn last line, which :func:`read_jsonl` drops (with a warning) and a resumed
run's :meth:`MetricsLog.truncate_after` removes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np

METRICS = "metrics.jsonl"
EVAL_RESULTS = "eval_results.json"
CURVES = "curves.png"

logger = logging.getLogger(__name__)


class MetricsLog:
  """Appends rows to ``metrics.jsonl`` (only ``enabled`` processes write: process 0)."""

  def __init__(self, output_dir: str | pathlib.Path, enabled: bool = True):
    self.path = pathlib.Path(output_dir) / METRICS
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops rows with ``step`` greater than ``step`` (the tail of an interrupted run)."""
    if not (self.enabled and self.path.exists()):
      return
    write_jsonl(self.path, [r for r in read_jsonl(self.path) if r.get("step", 0) <= step])

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
  """The rows of a JSON-lines file; a torn last line (a write cut short by a crash) is dropped.

  Raises:
    ValueError: a line other than the last is not JSON (the file is damaged, not torn).
  """
  text = pathlib.Path(path).read_text()
  lines = text.split("\n")
  rows = []
  for i, line in enumerate(lines):
    if not line:
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # no newline after it: the write was cut short
        logger.warning("%s: dropping its torn last line (a run stopped while writing it)", path)
        break
      raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg}); delete the file") from None
  return rows


@contextlib.contextmanager
def replacing(path: str | pathlib.Path) -> Iterator[pathlib.Path]:
  """A temporary sibling of ``path`` to write; renamed onto ``path`` when the block ends well,
  removed otherwise: ``path`` is written whole or not at all."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` whole or not at all (:func:`replacing`)."""
  with replacing(path) as tmp, tmp.open("w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())


def write_jsonl(path: str | pathlib.Path, rows: Sequence[dict]) -> None:
  write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def write_json(path: str | pathlib.Path, data: dict) -> None:
  write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# Counts and timings of an evaluation, not metrics to plot (GLUE's eval_samples, run_clm's
# eval_tokens); samples_* are the generated samples' scores (samples_exact_match), metrics.
_NOT_METRICS = ("loss", "samples", "runtime", "tokens")


def _is_metric(key: str) -> bool:
  """``eval_accuracy``, ``eval_f1_mm``, ``perplexity``, ``samples_exact_match``, ...: not the
  loss, counts or timings."""
  if key.startswith("eval_"):
    return not key.removeprefix("eval_").startswith(_NOT_METRICS)
  return key == "perplexity" or key.startswith("samples_")


def curve_keys(rows: list[dict]) -> tuple[list[str], list[str]]:
  """``(metrics, log-scale metrics)`` that :func:`plot_curves` draws on its right panel from
  the evaluation rows of ``rows`` (perplexity, on a log scale of its own)."""
  keys = sorted({k for r in rows for k in r if _is_metric(k)})
  return [k for k in keys if k != "perplexity"], [k for k in keys if k == "perplexity"]


def format_metrics(results: dict) -> str:
  """``eval_loss=0.6931 perplexity=2.0000 ...``: the metrics of an evaluation for the console.

  Example:
    >>> format_metrics({"eval_loss": 0.5, "eval_tokens": 12, "eval_runtime_s": 0.1})
    'eval_loss=0.5000 eval_tokens=12'
  """
  return " ".join(
    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
    for k, v in results.items()
    if "runtime" not in k
  )


def plot_curves(metrics_path: str | pathlib.Path, png_path: str | pathlib.Path) -> None:
  """Training and eval loss (left) and the eval metrics (right; perplexity on a log-scale axis
  of its own) against the step."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  rows = read_jsonl(metrics_path) if pathlib.Path(metrics_path).exists() else []
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if any(k.startswith("eval_") or _is_metric(k) for k in r)]
  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  eval_loss = [r for r in evals if "eval_loss" in r]
  if eval_loss:
    ax_loss.plot([r["step"] for r in eval_loss], [r["eval_loss"] for r in eval_loss], "o-")
    ax_loss.lines[-1].set_label("eval")
  ax_loss.set(xlabel="step", ylabel="loss", title="loss")
  ax_loss.legend()
  keys, log_keys = curve_keys(evals)
  for key in keys:
    pts = [(r["step"], r[key]) for r in evals if key in r]
    ax_eval.plot(*zip(*pts, strict=True), "o-", label=key.removeprefix("eval_"))
  ax_eval.set(xlabel="step", title="evaluation")
  if keys:
    ax_eval.legend(loc="upper left")
  if log_keys:
    ax_log = ax_eval.twinx() if keys else ax_eval
    for key in log_keys:
      pts = [(r["step"], r[key]) for r in evals if key in r]
      ax_log.plot(*zip(*pts, strict=True), "s--", color="tab:red", label=key)
    ax_log.set_yscale("log")
    ax_log.set_ylabel(", ".join(log_keys))
    ax_log.legend(loc="upper right")
  fig.tight_layout()
  try:
    with replacing(png_path) as tmp:
      fig.savefig(tmp, dpi=100, format="png")
  finally:
    plt.close(fig)


def write_predictions(
  path: str | pathlib.Path, predictions: np.ndarray, names: Sequence[str] | None = None
) -> None:
  """``index<TAB>prediction`` rows, as HF's run_glue.py: class names if known, else numbers."""
  lines = ["index\tprediction"]
  for i, p in enumerate(np.asarray(predictions).tolist()):
    if isinstance(p, float):
      value = f"{p:.3f}"
    else:
      value = names[p] if names else str(p)
    lines.append(f"{i}\t{value}")
  write_text(path, "\n".join(lines) + "\n")
