"""Sequence-classification heads, named like transformers' so checkpoints map one to one.

* BERT: ``pooler/dense`` + tanh on ``[CLS]``, dropout, then ``classifier`` (a bare Dense at the
  top of the model, wired in :class:`lora_jax.models.encoder.bert.Bert`).
* RoBERTa: ``classifier/dense`` + tanh + ``classifier/out_proj`` on ``<s>``, dropout before
  each Dense; no pooler.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from lora_jax.models.layers.block import Block


class BertPooler(Block):
  """``tanh(dense(hidden[:, 0]))``: HF's ``BertPooler``."""

  @nn.compact
  def __call__(self, hidden):
    dense = self.dense(self.config.hidden_size, "dense")
    return jnp.tanh(dense(hidden[:, 0]))


class RobertaClassificationHead(Block):
  """HF's ``RobertaClassificationHead``: ``out_proj(drop(tanh(dense(drop(hidden[:, 0])))))``."""

  @nn.compact
  def __call__(self, hidden, deterministic: bool = True):
    cfg = self.config
    drop = nn.Dropout(cfg.classifier_dropout)
    x = drop(hidden[:, 0], deterministic=deterministic)
    x = jnp.tanh(self.dense(cfg.hidden_size, "dense")(x))
    x = drop(x, deterministic=deterministic)
    return self.dense(cfg.num_labels, "out_proj")(x)
