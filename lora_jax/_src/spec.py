"""What an adapted module carries beside its weight, and the dense update it stands for.

An adapted module dict holds, next to its ``kernel`` (or ``embedding``):

* ``lora_a``: float32, shape ``[*W.shape[in_axes], rank]``;
* ``lora_b``: float32, shape ``[rank, *W.shape[out_axes]]``;
* ``lora_spec``: a :class:`LoraSpec`, registered as a *static* pytree node: it has no leaves,
  so ``jax.tree.map``, optimizers, ``jit`` and ``grad`` never see it, yet it travels with the
  tree (as part of its structure) and :func:`lora_jax.merge` needs nothing else.

The update is ``delta = scale * A @ B`` with the input axes of ``W`` flattened into the rows of
``A`` and the output axes into the columns of ``B``, transposed back to ``W``'s axis order.

Stacked weights (``nn.scan`` over layers stores each layer's kernel along a leading axis,
``[num_layers, in, out]``) carry stacked adapters: ``stacked`` leading axes are shared by the
weight and both factors (``lora_a [L, in, r]``, ``lora_b [L, r, out]``), each slice an
independent adapter; ``in_axes`` and ``out_axes`` then count the axes of one slice.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

LORA_A = "lora_a"
LORA_B = "lora_b"
LORA_SPEC = "lora_spec"
LORA_MAGNITUDE = "lora_magnitude"  # DoRA's trainable magnitude (``use_dora``), see dora.py
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_MAGNITUDE)
WEIGHT_NAMES = ("kernel", "embedding")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Static description of one adapter: everything :func:`merge` and the forward pass need.

  Attributes:
    rank: the adapter rank ``r``.
    alpha: LoRA's ``alpha``.
    rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    dropout: LoRA dropout rate on the adapter's input (low-rank path only).
    weight: name of the adapted leaf, ``"kernel"`` or ``"embedding"``.
    in_axes: axes of the weight contracted with the module's input (rows of ``A``).
    out_axes: axes of the weight that form the module's output (columns of ``B``).
    rule: the pattern of the rule that created the adapter (for reports and export).
    stacked: leading axes of the weight that stack independent layers (``nn.scan``); the
      factors share them, and ``in_axes``/``out_axes`` count the axes after them.
    use_dora: DoRA: the module also carries ``lora_magnitude`` (float32, one entry per output
      unit: the stacked axes, then the output axes) and its weight acts as
      ``m * (W + delta) / ||W + delta||`` (see :mod:`lora_jax._src.dora`).
    init: how the factors started (``LoraRule.init``); ``"pissa"``, ``"pissa_niter_K"`` and
      ``"olora"`` also replaced the weight by a residual (see :mod:`lora_jax._src.svd_init`).
  """

  rank: int
  alpha: float
  rslora: bool
  dropout: float
  weight: str
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  rule: str = ""
  stacked: int = 0
  use_dora: bool = False
  init: str = "gaussian"

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def a_shape(self, weight_shape) -> tuple[int, ...]:
    stack, layer = weight_shape[: self.stacked], weight_shape[self.stacked :]
    return (*stack, *(layer[i] for i in self.in_axes), self.rank)

  def b_shape(self, weight_shape) -> tuple[int, ...]:
    stack, layer = weight_shape[: self.stacked], weight_shape[self.stacked :]
    return (*stack, self.rank, *(layer[o] for o in self.out_axes))


jax.tree_util.register_static(LoraSpec)


def delta(spec: LoraSpec, a: jax.Array, b: jax.Array) -> jax.Array:
  """``scale * A @ B`` in float32, laid out like the weight the adapter belongs to."""
  if spec.stacked:  # one independent update per stacked slice
    one = dataclasses.replace(spec, stacked=spec.stacked - 1)
    return jax.vmap(lambda a, b: delta(one, a, b))(a, b)
  n_in = len(spec.in_axes)
  in_shape, out_shape = a.shape[:n_in], b.shape[1:]
  a2 = jnp.reshape(a.astype(jnp.float32), (math.prod(in_shape), spec.rank))
  b2 = jnp.reshape(b.astype(jnp.float32), (spec.rank, math.prod(out_shape)))
  d = jnp.reshape((a2 @ b2) * spec.scale, (*in_shape, *out_shape))
  # d's axes are (in_axes..., out_axes...); put them back in the weight's order.
  order = spec.in_axes + spec.out_axes
  return jnp.transpose(d, tuple(order.index(i) for i in range(len(order))))
