"""An adapter bank on linen's low-rank path: each row of the batch through its own adapter.

Called by :mod:`lora_jax._src.apply`'s interceptor for a module holding a ``lora_bank``. The
module runs once, unchanged, on the whole batch; each row then gathers its adapter's ``A``,
``B`` and scale (``[batch, *in, r]``: small beside the activations) and adds
``s * (x @ A) @ B`` by two batched matmuls. Rows with id ``-1`` get scale 0: the base alone.
This was chosen over a one-hot einsum over all adapters (``n`` times the adapter FLOPs of one)
and over sorting rows by adapter for ``jax.lax.ragged_dot`` (a sort and an un-sort of the
activations per module): see bench/bank.py.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax._src import bank as bank_lib
from lora_jax._src import layouts
from lora_jax._src import low_rank
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B

DROPOUT_RNG = "lora_dropout"


def _dropout(module: nn.Module, x, rates, index):
  """Per-row LoRA dropout: row ``i`` drops at its adapter's rate (inverted dropout)."""
  if not any(rates) or not module.has_rng(DROPOUT_RNG):
    return x
  keep = 1.0 - jnp.take(jnp.asarray(rates, jnp.float32), index)
  keep = keep.reshape((-1,) + (1,) * (x.ndim - 1))
  mask = jax.random.uniform(module.make_rng(DROPOUT_RNG), x.shape) < keep
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def _batch_first(path: str, what: str):
  raise ValueError(
    f"module {path!r} holds an adapter bank, but its {what}: adapter_ids give one adapter per "
    "row of the batch, which must be the first axis of the module's input"
  )


def contribution(
  module: nn.Module, method: str, x, ids, bank: bank_lib.BankSpec, dtype, path, einsum_str=None
):
  """The bank's contribution to ``module.method(x)`` for rows ``ids``, in ``dtype``."""
  a = module.get_variable("params", LORA_A)
  b = module.get_variable("params", LORA_B)
  scale = module.get_variable("params", bank_lib.LORA_SCALE)
  ids = bank_lib.row_ids(ids, bank.names, x.shape[0])
  index = jnp.maximum(ids, 0)
  _, b_rows, s_rows = bank_lib.gathered(ids, a, b, scale)
  s = s_rows.astype(dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  if isinstance(module, nn.Embed):
    if method == "attend":  # query @ (s A B)^T per row
      t = jnp.einsum("b...o,bro->b...r", x.astype(dtype), b_rows.astype(dtype)) * s
      return jnp.einsum("b...r,bvr->b...v", t, jnp.take(a, index, axis=0).astype(dtype))
    rows = index.reshape((-1,) + (1,) * (x.ndim - 1))
    t = a[rows, x].astype(dtype) * s[..., None]  # [batch, ..., r]: each token's row of its A
    return jnp.einsum("b...r,bro->b...o", t, b_rows.astype(dtype))
  x = _dropout(module, x, bank.dropout, index)
  a_rows = jnp.take(a, index, axis=0)
  if isinstance(module, nn.Dense | nn.DenseGeneral):
    axes = (-1,) if isinstance(module, nn.Dense) else layouts.as_tuple(module.axis)
    if 0 in {ax % x.ndim for ax in axes}:
      _batch_first(path, f"contracted axes {axes} include the first")
    x = low_rank.contracted_last(x, axes)
    return bank_lib.rows_matmul(x, a_rows, b_rows, s_rows, len(axes), dtype)
  if isinstance(module, nn.Einsum):
    eq = (einsum_str or module.einsum_str).replace(" ", "")
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    ins = "".join(rhs[i] for i in bank.in_axes)
    outs = "".join(rhs[o] for o in bank.out_axes)
    kept = re.sub(f"[{ins}]", "", lhs)
    if not kept or kept[0] != lhs[0] or out[0] != lhs[0]:
      _batch_first(path, f"equation {eq!r} does not keep the first input axis first")
    x = jnp.einsum(f"{lhs}->{kept}{ins}", x.astype(dtype))
    y = bank_lib.rows_matmul(x, a_rows, b_rows, s_rows, len(ins), dtype)
    return jnp.einsum(f"{kept}{outs}->{out}", y)
  raise ValueError(
    f"module {path!r} ({type(module).__name__}) holds an adapter bank; banks run on nn.Dense, "
    "nn.DenseGeneral, nn.Einsum and nn.Embed"
  )
