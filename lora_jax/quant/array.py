"""The quantized kernel type: :class:`QuantizedArray`, a pytree of stored arrays.

A quantized kernel is a :class:`QuantizedArray`, a registered pytree node whose children are
the stored arrays and whose static part says how to read them:

``kind="nf4"`` (QLoRA, Dettmers et al. 2023; bitsandbytes' ``quantize_4bit(quant_type="nf4")``)
  The weight as transformers stores it (``[out, in]``, the transpose of a Flax ``[in, out]``
  kernel), flattened row-major, is cut into blocks of ``block_size`` values. Each block keeps
  its absolute maximum (``absmax``, float32) and each value the index of the nearest of the 16
  NormalFloat levels of ``value / absmax``; two indices are packed per byte, the first in the
  high nibble (``codes``, uint8, ``ceil(n / 2)`` per weight). With ``double_quant`` the
  absmaxes are quantized again as bitsandbytes' ``compress_statistics`` does: their mean
  (``offset``) is subtracted and the rest is stored as 8-bit indices into bitsandbytes'
  signed dynamic map (``absmax`` becomes uint8), in blocks of 256 with a float32 absmax each
  (``absmax2``). A bitsandbytes 4-bit weight maps onto these arrays one to one.

``kind="int8"``
  Per output unit (a column of the kernel): ``absmax`` float32 and ``codes`` int8
  ``round(127 * w / absmax)`` in the kernel's own layout, so ``|w - dequantize| <= absmax/254``.

Kernels stacked by ``nn.scan`` (``[L, in, out]``) keep a leading ``L`` axis on every child,
each layer quantized on its own, so the scan hands each layer an ordinary quantized kernel.
The static part stores one layer's shape and dtype; the stacked axes are read off the children.

:func:`lora_jax.lora_apply` runs a module holding a quantized weight on the dequantized weight,
formed inside the compiled step, one module at a time (and formed again in the backward pass
rather than kept), so no dequantized copy of the model exists. A plain ``model.apply`` cannot
read quantized kernels: call it through ``lora_apply``, or :func:`lora_jax.merge` first.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_pytree_with_keys_class
class QuantizedArray:
  """A quantized kernel: stored arrays (pytree children) plus how to read them (static).

  Children (``None`` where a kind has none): ``codes``, ``absmax``, ``absmax2``, ``offset``;
  see the module docstring. Every child has the stacked (``nn.scan``) axes first.

  Attributes:
    kind: ``"nf4"`` or ``"int8"``.
    block_size: values per NF4 block (``0`` for int8).
    double_quant: NF4's absmaxes are themselves quantized to 8 bits.
    layer_shape: the logical shape of one layer's kernel (``[in, out]``).
    dtype: the logical dtype (of the weight that was quantized, and of :func:`dequantize`).
  """

  def __init__(
    self,
    codes,
    absmax,
    absmax2=None,
    offset=None,
    *,
    kind,
    block_size,
    double_quant,
    layer_shape,
    dtype,
  ):
    self.codes, self.absmax, self.absmax2, self.offset = codes, absmax, absmax2, offset
    self.kind, self.block_size, self.double_quant = kind, block_size, double_quant
    self.layer_shape, self.dtype = tuple(layer_shape), np.dtype(dtype)

  def _static(self):
    return (self.kind, self.block_size, self.double_quant, self.layer_shape, self.dtype)

  def tree_flatten_with_keys(self):
    keys = ("codes", "absmax", "absmax2", "offset")
    children = tuple((jax.tree_util.GetAttrKey(k), getattr(self, k)) for k in keys)
    return children, self._static()

  @classmethod
  def tree_unflatten(cls, static, children):
    kind, block_size, double_quant, layer_shape, dtype = static
    return cls(
      *children,
      kind=kind,
      block_size=block_size,
      double_quant=double_quant,
      layer_shape=layer_shape,
      dtype=dtype,
    )

  @property
  def stacked(self) -> int:
    """Leading axes stacking layers (``nn.scan``); 0 inside the scan."""
    per_layer = 1 if self.kind == "nf4" else len(self.layer_shape)
    return len(self.codes.shape) - per_layer

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape: the stacked axes, then one layer's kernel shape."""
    return (*tuple(self.codes.shape)[: self.stacked], *self.layer_shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes the stored arrays take."""
    return sum(_nbytes(x) for x in (self.codes, self.absmax, self.absmax2, self.offset))

  def describe(self) -> str:
    if self.kind == "int8":
      return "int8"
    return f"nf4 block={self.block_size}" + (" dq" if self.double_quant else "")

  def __repr__(self) -> str:
    if not hasattr(self.codes, "shape"):  # a tree of something else (e.g. a mask) in its shape
      return f"QuantizedArray({self.describe()}, codes={self.codes!r}, absmax={self.absmax!r})"
    return f"QuantizedArray({self.describe()}, shape={self.shape}, dtype={self.dtype.name})"

  def __jax_array__(self):
    raise TypeError(
      f"{self!r} is a quantized kernel: run the model through lora_jax.lora_apply(model.apply) "
      "(which dequantizes each module's weight inside the step), or dequantize the tree with "
      "lora_jax.merge"
    )


def _nbytes(x) -> int:
  return 0 if x is None else math.prod(x.shape) * np.dtype(x.dtype).itemsize


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedArray)


def has_quantized(params) -> bool:
  leaves = jax.tree.leaves(params, is_leaf=is_quantized)
  return any(isinstance(x, QuantizedArray) for x in leaves)


def stack(parts: list[QuantizedArray]) -> QuantizedArray:
  """Layers quantized one by one, as one kernel with a leading layer axis (``nn.scan``)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
