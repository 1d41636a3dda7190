"""Supervised fine-tuning of a causal LM as a :class:`train.engine.run.Task`: the next-token loss
over the target tokens, eval loss and perplexity, and greedy samples (:mod:`.sampler`) at every
evaluation."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from train.data import clm as clm_data
from train.tasks.clm.sampler import Sampler


def token_losses(nll, batch):
  """``(weighted loss, weight)`` of each listed target, ``[rows, k]``, from :func:`forward`'s
  per-target cross-entropies."""
  w = batch["target_weights"]
  return nll * w, w


def loss_terms(nll, batch):
  """``(sum of weighted next-token losses, sum of weights)`` over a batch of rows."""
  loss, w = token_losses(nll, batch)
  return jnp.sum(loss), jnp.sum(w)


def forward(apply_fn, trainable, frozen, batch, *, fused: bool = True, **kwargs):
  """The cross-entropy of each of the batch's targets, ``[rows, k]`` float32.

  The model's outputs are formed at the batch's ``target_positions`` only
  (:func:`train.data.clm.targets`): the next-token losses that count, none other computed.
  ``fused``: by the decoder's ``target_ids=`` (the logits a chunk at a time, never whole);
  otherwise from the ``[rows, k, vocab]`` logits (an output layer with an adapter or a
  quantized weight, see :func:`lora_jax.models.decoder.llama.output_weight`).
  """
  variables = lora_jax.combine(trainable, frozen)
  if fused:
    kwargs["target_ids"] = batch["target_ids"]
  if "adapter_ids" in batch:  # a bank (--adapter_column): each row through its own adapter
    kwargs["adapter_ids"] = batch["adapter_ids"]
  out = apply_fn(
    variables,
    batch["input_ids"],
    batch["attention_mask"],
    segment_ids=batch["segment_ids"],
    logits_index=batch["target_positions"],
    **kwargs,
  )
  if fused:
    return out
  return optax.softmax_cross_entropy_with_integer_labels(
    out.astype(jnp.float32), batch["target_ids"]
  )


@dataclasses.dataclass
class CausalLM:
  """Supervised fine-tuning of a causal LM, for :func:`train.engine.run.run`."""

  apply_fn: Callable
  train: clm_data.Batcher
  eval: clm_data.Batcher | None
  global_rows: int
  eval_rows: int
  seed: int
  sampler: Sampler | None = None
  fused_loss: bool = True  # see forward()
  adapters: tuple[str, ...] | None = None  # a bank's names: each one's eval loss is reported

  def loss(self, trainable, frozen, batch, rngs):
    nll = forward(self.apply_fn, trainable, frozen, batch, fused=self.fused_loss,
                  deterministic=False, rngs=rngs)  # fmt: skip
    return loss_terms(nll, batch)

  def eval_step(self, trainable, frozen, batch):
    """Per row: its summed target loss and its number of targets."""
    nll = forward(self.apply_fn, trainable, frozen, batch, fused=self.fused_loss,
                  deterministic=True)  # fmt: skip
    loss, w = token_losses(nll, batch)
    return jnp.stack([jnp.sum(loss, axis=1), jnp.sum(w, axis=1)], axis=1)

  def batches(self, start: int, data_parallel: int):
    return self.train.train_batches(self.global_rows, self.seed, start)

  def counts(self, batch: dict) -> tuple[int, int]:
    starts = (batch["segment_ids"] > 0) & (
      np.pad(batch["segment_ids"], ((0, 0), (1, 0)))[:, :-1] != batch["segment_ids"]
    )
    return int(starts.sum()), int(batch["attention_mask"].sum())

  def evaluate(self, step: int, parallel, trainable, frozen) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if self.eval is not None:
      t0 = time.perf_counter()
      n = len(self.adapters or ())
      per = np.zeros((n + 1, 2))  # [adapter, (loss, weight)]; the last: filler rows, or all
      for batch in self.eval.eval_batches(self.eval_rows):
        sums = np.asarray(parallel.eval(trainable, frozen, parallel.put_batch(batch)), np.float64)
        np.add.at(per, batch.get("adapter_ids", np.full(len(sums), n)), sums)
      total, weight = per.sum(axis=0)
      loss = float(total / max(weight, 1.0))
      results = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "eval_tokens": int(weight),
      }
      for name, (t, w) in zip(self.adapters or (), per, strict=False):
        results[f"eval_loss_{name}"] = float(t / max(w, 1.0))
      results["eval_runtime_s"] = round(time.perf_counter() - t0, 3)
    if self.sampler is not None:
      results.update(self.sampler(step, parallel.host(trainable)))
    return results
