"""One compiled training step, the same for every task and parallel mode.

A script hands :func:`make_train_step` its loss; :mod:`train.engine.parallel` compiles the step
for its mode and :mod:`train.engine.loop` runs it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from train.engine.state import TrainState

# Steps.


def make_train_step(loss_fn: Callable, tx, axis_name: str | None = None):
  """``step(state, frozen, batch) -> (state, metrics)``: one micro-batch, one (maybe partial)
  update; ``metrics`` holds the batch's mean ``loss`` and the gradients' ``grad_norm``.

  ``loss_fn(trainable, frozen, batch, rngs) -> (total, weight)`` is the task's: the sum of the
  batch's weighted losses and the sum of the weights (rows, or tokens). The step differentiates
  ``total``, sums ``total``, ``weight`` and the gradients over ``axis_name`` (``pmap``), then
  divides by the weight: every mode averages over the whole global batch, however unevenly the
  weight falls on the devices. ``rngs`` has ``"dropout"`` and ``"lora_dropout"`` keys derived
  from ``state.rng`` and ``state.step`` (and the device index under ``pmap``).
  """

  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
      key = jax.random.fold_in(key, lax.axis_index(axis_name))
    k_dropout, k_lora = jax.random.split(key)
    rngs = {"dropout": k_dropout, "lora_dropout": k_lora}

    def compute(trainable):
      return loss_fn(trainable, frozen, batch, rngs)

    (total, weight), grads = jax.value_and_grad(compute, has_aux=True)(state.trainable)
    if axis_name is not None:
      total, weight, grads = lax.psum((total, weight, grads), axis_name)
    scale = 1.0 / jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new = state._replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    return new, {"loss": total * scale, "grad_norm": optax.global_norm(grads)}

  return step
