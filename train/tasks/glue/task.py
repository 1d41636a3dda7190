"""GLUE as a :class:`train.engine.run.Task`: sequence classification (or regression) on its batches.

The loss is the weighted cross-entropy (squared error for STS-B) of each row's logits; filler
rows (weight 0) pad the last batch of an epoch and count for nothing. Evaluation runs every
eval split and computes the task's GLUE metrics (:mod:`train.tasks.glue.metrics`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from train.data import glue as glue_data
from train.tasks.glue import metrics as glue_metrics

PACKED_KEYS = ("segment_ids", "cls_index")  # batches from train.data.packing


def forward(apply_fn, trainable, frozen, batch, **kwargs):
  """The model's logits for a batch (padded rows, or packed rows with ``segment_ids``)."""
  variables = lora_jax.combine(trainable, frozen)
  packed = {k: batch[k] for k in PACKED_KEYS if k in batch}
  return apply_fn(
    variables,
    batch["input_ids"],
    batch["attention_mask"],
    batch["token_type_ids"],
    **packed,
    **kwargs,
  )


def loss_terms(logits, labels, weights, regression: bool):
  """``(sum of weighted per-row losses, sum of weights)``: cross-entropy or squared error."""
  if regression:
    per_row = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
  else:
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(per_row * weights), jnp.sum(weights)


def loss_fn(logits, labels, weights, regression: bool):
  """Weighted mean cross-entropy (classes) or squared error (regression); weight 0 = filler."""
  total, weight = loss_terms(logits, labels, weights, regression)
  return total / jnp.maximum(weight, 1.0)


def eval_loss(logits: np.ndarray, labels: np.ndarray, regression: bool) -> float:
  if regression:
    return float(np.mean(np.square(logits[:, 0] - labels)))
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return float(-np.mean(logp[np.arange(len(labels)), labels]))


@dataclasses.dataclass
class Classification:
  """A GLUE task's training and evaluation, for :func:`train.engine.run.run`.

  Attributes:
    apply_fn: ``lora_jax.lora_apply(module.apply)``.
    task: the GLUE task (:class:`glue_data.GlueTask`).
    train: tokenised training rows.
    evals: eval splits by name, the main one first (MNLI: matched, then mismatched).
    global_batch: training rows per micro-batch.
    eval_batch: rows per evaluation batch.
    buckets: padded lengths (see :func:`train.data.batching.bucket_lengths`).
    seed: the data order's seed.
    pack_sequences: padding-free batches, one packing group per data-parallel shard.
  """

  apply_fn: Callable
  task: glue_data.GlueTask
  train: glue_data.Examples
  evals: dict[str, glue_data.Examples]
  global_batch: int
  eval_batch: int
  buckets: tuple[int, ...]
  seed: int
  pack_sequences: bool = True
  pack: int = 0  # set from the data-parallel size when batches start

  def loss(self, trainable, frozen, batch, rngs):
    logits = forward(self.apply_fn, trainable, frozen, batch, deterministic=False, rngs=rngs)
    return loss_terms(logits, batch["labels"], batch["weights"], self.task.is_regression)

  def eval_step(self, trainable, frozen, batch):
    return forward(self.apply_fn, trainable, frozen, batch, deterministic=True)

  def batches(self, start: int, data_parallel: int):
    self.pack = data_parallel if self.pack_sequences else 0
    return glue_data.train_batches(
      self.train, self.global_batch, self.buckets, self.seed, start=start, pack=self.pack
    )

  def counts(self, batch: dict) -> tuple[int, int]:
    return int(batch["weights"].sum()), int(batch["attention_mask"].sum())

  def logits(self, parallel, trainable, frozen, examples) -> np.ndarray:
    """Logits ``[N, num_labels]`` for every row of ``examples``, in their order."""
    out = None
    batches = glue_data.eval_batches(examples, self.eval_batch, self.buckets, self.pack)
    for rows, batch in batches:
      logits = parallel.eval(trainable, frozen, parallel.put_batch(batch))
      if out is None:
        out = np.zeros((len(examples), logits.shape[-1]), np.float32)
      out[rows] = logits[: len(rows)]
    return out

  def evaluate(self, step: int, parallel, trainable, frozen) -> dict[str, Any]:
    """``eval_*`` metrics of every eval split; the second (MNLI mismatched) gets ``_mm``."""
    results = {}
    for i, ex in enumerate(self.evals.values()):
      t0 = time.perf_counter()
      logits = self.logits(parallel, trainable, frozen, ex)
      suffix = "" if i == 0 else "_mm"
      metrics = glue_metrics.compute(self.task.name, logits, ex.labels)
      metrics["loss"] = eval_loss(logits, ex.labels, self.task.is_regression)
      results.update({f"eval_{k}{suffix}": v for k, v in metrics.items()})
      results[f"eval_samples{suffix}"] = len(ex)
      results[f"eval_runtime{suffix}_s"] = round(time.perf_counter() - t0, 3)
    return results
