"""Training an adapter bank: each adapter's slice moves only on steps where its rows are in the
batch.

In a mixed batch each row's gradient reaches only its own adapter's slice of ``lora_a`` and
``lora_b`` (the gather in the forward pass scatters back), so an adapter with no rows gets an
exactly zero gradient. Adam-type optimizers would still move it (momentum from earlier steps,
decoupled weight decay); :func:`skip_absent_adapters` keeps such a slice, and its optimizer
state, exactly as they were. Elementwise optimizers (SGD, Adam, AdamW, Lion, ...) then update
every adapter in the bank as if it trained alone on its own rows; transforms that couple leaves
(a global-norm clip over the whole tree) couple the adapters too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lora_jax._src import bank as bank_lib
from lora_jax._src import paths
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B


def _bank_axes(tree) -> dict[str, int]:
  """``{module path: position of the bank axis}`` for every banked module of ``tree``."""
  t, _ = paths.split_params(tree)
  return {
    p: m[bank_lib.LORA_BANK].stacked for p, m in paths.iter_modules(t) if bank_lib.LORA_BANK in m
  }


def _presence(grads, banks: dict[str, int]):
  """A tree like ``grads``: for bank factors, whether each adapter's slice has a non-zero
  gradient at its module (A's or B's), shaped to broadcast against the leaf; else ``True``."""
  t, rebuild = paths.split_params(grads)

  def per_module(path: str, module: dict) -> dict:
    if path not in banks or LORA_A not in module or LORA_B not in module:
      return module
    axis = banks[path]

    def any_but(x):  # [*stacked, n]
      return jnp.any(x != 0, axis=tuple(range(axis + 1, x.ndim)))

    present = any_but(module[LORA_A]) | any_but(module[LORA_B])
    out = dict(module)
    for leaf in (LORA_A, LORA_B):
      x = module[leaf]
      out[leaf] = present.reshape(present.shape + (1,) * (x.ndim - present.ndim))
    return out

  masks = rebuild(paths.map_modules(per_module, t))
  # the bank factors' masks are new arrays; every other leaf is still the gradient: True
  return jax.tree.map(lambda g, m: True if m is g else m, grads, masks)


def skip_absent_adapters(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner``, except that an adapter of a bank whose gradient is zero at a module (no rows in
  the batch) keeps its parameters and its optimizer state there unchanged.

  Trees without a bank pass through as ``inner`` would update them.
  """

  def init_fn(params):
    return inner.init(params)

  def update_fn(grads, state, params=None):
    updates, new_state = inner.update(grads, state, params)
    banks = _bank_axes(grads)
    if not banks:
      return updates, new_state
    present = _presence(grads, banks)
    updates = jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, present)
    masks = optax.tree_utils.tree_map_params(
      inner, lambda _, m: m, new_state, present, transform_non_params=lambda _: True
    )
    new_state = jax.tree.map(
      lambda new, old, m: new if m is True else jnp.where(m, new, old), new_state, state, masks
    )
    return updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)
