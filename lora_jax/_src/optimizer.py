"""``lora_optimizer``: an Optax transform that updates adapters and leaves the base alone."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax

from lora_jax._src.merge import has_adapters
from lora_jax._src.partition import path_labels
from lora_jax._src.partition import trainable_mask

TRAINABLE, FROZEN = "trainable", "frozen"


def lora_optimizer(
  tx: optax.GradientTransformation, params, extra_trainable: Sequence[str] = ()
) -> optax.GradientTransformation:
  """``tx`` on adapter (and ``extra_trainable``) leaves; ``optax.set_to_zero`` everywhere else.

  Built on ``optax.multi_transform``: frozen leaves get zero updates and carry no optimizer
  state. Labels are derived from each tree's leaf paths, so the same transform serves the
  whole parameter tree or only its trainable half from :func:`partition` (the fast path:
  gradients and state exist only for what trains).

  Args:
    tx: the optimizer for trainable leaves, e.g. ``optax.adamw(1e-4)``.
    params: the adapted parameters (used to check that there is something to train).
    extra_trainable: regexes of further trainable leaf paths, as in :func:`trainable_mask`.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, optax
    >>> from lora_jax import LoraRule, lora_init, lora_optimizer
    >>> v = lora_init(nn.Dense(8).init(jax.random.key(0), jnp.ones((1, 16))),
    ...               LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> tx = lora_optimizer(optax.adam(1e-3), v)
    >>> state = tx.init(v)  # Adam moments for lora_a and lora_b only
    >>> sum(x.size for x in jax.tree.leaves(state)) == 2 * (16 * 2 + 2 * 8) + 1
    True
  """
  if not has_adapters(params):
    raise ValueError("params carry no LoRA adapters; call lora_init(params, rules, rng=...) first")
  trainable_mask(params, extra_trainable)  # validates the patterns against real paths

  def labels(tree):
    return jax.tree.map(lambda t: TRAINABLE if t else FROZEN, path_labels(tree, extra_trainable))

  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
