"""A run's training state, its optimizer and learning-rate schedule, and the compute dtype.

Only the trainable partition (adapters + extra-trainable leaves such as a classifier head, from
:func:`lora_jax.partition`) is differentiated, updated and given optimizer state; the frozen
base is an ordinary, non-differentiated argument of every step (:mod:`train.engine.step`).
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import lora_jax
from train.engine.kinds import DTYPES
from train.engine.kinds import LR_SCHEDULERS


class TrainState(NamedTuple):
  """Everything that changes during training (the frozen base is not here).

  Attributes:
    step: micro-batches consumed so far (int32 scalar); optimizer steps are
      ``step // gradient_accumulation_steps``, and it is the data position.
    trainable: the trainable partition (``None`` where a leaf is frozen).
    opt_state: optimizer state of ``trainable``.
    rng: ``jax.random.key_data`` of the run's base key; each micro-batch folds ``step`` in.
  """

  step: jax.Array
  trainable: Any
  opt_state: Any
  rng: jax.Array


def init_state(trainable, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    opt_state=tx.init(trainable),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def linear_schedule(learning_rate: float, total_steps: int, warmup_steps: int):
  """Linear warmup from 0 to ``learning_rate``, then linear decay to 0 at ``total_steps``.

  The same curve as transformers' ``get_linear_schedule_with_warmup``.

  Example:
    >>> s = linear_schedule(1.0, 10, 2)
    >>> [round(float(s(i)), 3) for i in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  return make_schedule("linear", learning_rate, total_steps, warmup_steps)


def make_schedule(kind: str, learning_rate: float, total_steps: int, warmup_steps: int):
  """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then ``kind``.

  transformers' schedules: ``"linear"`` decays to 0 at ``total_steps``
  (``get_linear_schedule_with_warmup``), ``"cosine"`` follows half a cosine to 0
  (``get_cosine_schedule_with_warmup``), ``"constant"`` stays
  (``get_constant_schedule_with_warmup``).

  Example:
    >>> s = make_schedule("cosine", 1.0, 10, 2)
    >>> [round(float(s(i)), 3) for i in (1, 2, 6, 10)]
    [0.5, 1.0, 0.5, 0.0]
  """
  if kind not in LR_SCHEDULERS:
    raise ValueError(f"unknown learning-rate schedule {kind!r}; valid: {', '.join(LR_SCHEDULERS)}")
  warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  decay_steps = max(total_steps - warmup_steps, 1)
  after = {
    "linear": optax.linear_schedule(learning_rate, 0.0, decay_steps),
    "cosine": optax.cosine_decay_schedule(learning_rate, decay_steps),
    "constant": optax.constant_schedule(learning_rate),
  }[kind]
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
  params,
  schedule,
  *,
  weight_decay: float,
  accumulation: int = 1,
  extra_trainable=(),
  max_grad_norm: float | None = None,
  loraplus_lr_ratio: float | None = None,
) -> optax.GradientTransformation:
  """AdamW on the trainable leaves (``lora_jax.lora_optimizer``), gradients first clipped to
  ``max_grad_norm`` (global norm over the trainable leaves) if given; with
  ``loraplus_lr_ratio``, LoRA+ (B's updates scaled by it); accumulated if asked."""
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  if max_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
  tx = lora_jax.lora_optimizer(tx, params, extra_trainable, loraplus_lr_ratio=loraplus_lr_ratio)
  return optax.MultiSteps(tx, every_k_schedule=accumulation) if accumulation > 1 else tx


def jnp_dtype(dtype: str):
  """``--dtype``'s name (:data:`train.engine.kinds.DTYPES`) as a jax scalar type.

  Example:
    >>> jnp_dtype("bfloat16") is jnp.bfloat16, jnp_dtype("float32") is jnp.float32
    (True, True)
  """
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
  return jnp.bfloat16 if dtype == "bfloat16" else jnp.float32


def compute_dtype(frozen, dtype: str):
  """The frozen base in the compute ``dtype``: bf16 for ``"bfloat16"``, else as it is.

  Adapters, trained extras and optimizer state stay float32; quantized kernels keep their stored
  arrays (their scales too), the module computes in bf16.
  """
  if dtype != "bfloat16":
    return frozen

  def cast(x):
    if isinstance(x, lora_jax.QuantizedArray) or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x.astype(jnp.bfloat16)

  return jax.tree.map(cast, frozen, is_leaf=lambda x: isinstance(x, lora_jax.QuantizedArray))
