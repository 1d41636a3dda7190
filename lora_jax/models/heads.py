"""Sequence-classification heads, named like transformers' so checkpoints map one to one.

* BERT: ``pooler/dense`` + tanh on ``[CLS]``, dropout, then ``classifier`` (a bare Dense at the
  top of the model, wired in :class:`lora_jax.models.bert.Bert`).
* RoBERTa: ``classifier/dense`` + tanh + ``classifier/out_proj`` on ``<s>``, dropout before
  each Dense; no pooler.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn


def _dense(config: Any, features: int, dtype, param_dtype, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.initializers.normal(config.initializer_range),
    name=name,
  )


class BertPooler(nn.Module):
  """``tanh(dense(hidden[:, 0]))``: HF's ``BertPooler``."""

  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    dense = _dense(self.config, self.config.hidden_size, self.dtype, self.param_dtype, "dense")
    return jnp.tanh(dense(hidden[:, 0]))


class RobertaClassificationHead(nn.Module):
  """HF's ``RobertaClassificationHead``: ``out_proj(drop(tanh(dense(drop(hidden[:, 0])))))``."""

  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, deterministic: bool = True):
    cfg = self.config
    drop = nn.Dropout(cfg.classifier_dropout)
    x = drop(hidden[:, 0], deterministic=deterministic)
    x = jnp.tanh(_dense(cfg, cfg.hidden_size, self.dtype, self.param_dtype, "dense")(x))
    x = drop(x, deterministic=deterministic)
    return _dense(cfg, cfg.num_labels, self.dtype, self.param_dtype, "out_proj")(x)
