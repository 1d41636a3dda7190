"""``lora_optimizer``: an Optax transform that updates adapters and leaves the base alone."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import optax

from lora_jax._src.bank import is_bank
from lora_jax._src.bank_optimizer import skip_absent_adapters
from lora_jax._src.merge import has_adapters
from lora_jax._src.partition import path_labels
from lora_jax._src.partition import trainable_mask
from lora_jax._src.paths import keypath_str
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE

TRAINABLE, FROZEN = "trainable", "frozen"


SCALED = (LORA_B, LORA_MAGNITUDE)  # LoRA+'s faster leaves


def lora_optimizer(
  tx: optax.GradientTransformation,
  params,
  extra_trainable: Sequence[str] = (),
  *,
  loraplus_lr_ratio: float | None = None,
) -> optax.GradientTransformation:
  """``tx`` on adapter (and ``extra_trainable``) leaves; ``optax.set_to_zero`` everywhere else.

  Built on ``optax.multi_transform``: frozen leaves get zero updates and carry no optimizer
  state. Labels are derived from each tree's leaf paths, so the same transform serves the
  whole parameter tree or only its trainable half from :func:`partition` (the fast path:
  gradients and state exist only for what trains).

  LoRA+ (Hayou et al. 2024; PEFT's ``create_loraplus_optimizer``): with ``loraplus_lr_ratio``
  each ``lora_b`` update (and DoRA's ``lora_magnitude``, a 1-D leaf PEFT puts in B's group) is
  ``tx``'s times the ratio, which for SGD, Adam and AdamW (whose
  updates, decoupled weight decay included, are proportional to the learning rate) is ``tx``
  with the ratio times its learning rate on B. ``tx`` itself sees every trainable leaf, so a
  gradient clipping inside it still clips by the norm over all of them. (PEFT also moves other
  trainable 1-D leaves into B's group and gives embedding adapters their own rate; here only
  ``lora_b`` and ``lora_magnitude`` leaves change.)

  Args:
    tx: the optimizer for trainable leaves, e.g. ``optax.adamw(1e-4)``.
    params: the adapted parameters (used to check that there is something to train).
    extra_trainable: regexes of further trainable leaf paths, as in :func:`trainable_mask`.
    loraplus_lr_ratio: LoRA+'s ratio of B's learning rate to A's (the paper suggests 16), or
      ``None`` for plain LoRA.

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
  if not (has_adapters(params) or is_bank(params)):
    raise ValueError("params carry no LoRA adapters; call lora_init(params, rules, rng=...) first")
  trainable_mask(params, extra_trainable)  # validates the patterns against real paths

  def labels(tree):
    return jax.tree.map(lambda t: TRAINABLE if t else FROZEN, path_labels(tree, extra_trainable))

  masked = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
  if is_bank(params):  # an adapter without rows in a batch stays as it was (bank_optimizer.py)
    masked = skip_absent_adapters(masked)
  if loraplus_lr_ratio is None:
    return masked
  ratio = loraplus_lr_ratio
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
    raise ValueError(f"loraplus_lr_ratio={ratio!r} must be a positive finite number (e.g. 16)")

  def scale_b(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
      lambda kp, u: u * ratio if keypath_str(kp).rsplit("/", 1)[-1] in SCALED else u, updates
    )

  return optax.chain(masked, optax.stateless(scale_b))
