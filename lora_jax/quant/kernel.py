"""One kernel, quantized (layer by layer when stacked) and dequantized, whatever its kind."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax.quant import int8
from lora_jax.quant import nf4
from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.array import is_quantized


def quantize_kernel(kernel, stacked: int, kind: str, block_size: int, double_quant: bool):
  """A :class:`QuantizedArray` of ``kernel`` (``stacked`` leading layer axes), layer by layer."""
  shape = tuple(kernel.shape)
  layer_shape = shape[stacked:]

  def one(w):
    if kind == "nf4":
      return nf4.quantize_layer(w, block_size, double_quant)
    return int8.quantize_layer(w)

  def run(w):
    if not stacked:
      return one(w)
    flat = w.reshape(-1, *layer_shape)
    out = jax.lax.map(one, flat)  # one layer at a time: no stack-sized temporaries
    return jax.tree.map(lambda c: c.reshape(*shape[:stacked], *c.shape[1:]), out)

  if isinstance(kernel, jax.ShapeDtypeStruct):
    children = jax.eval_shape(run, kernel)
  else:
    children = jax.jit(run)(kernel) if stacked else run(kernel)
  return QuantizedArray(
    *children,
    kind=kind,
    block_size=block_size if kind == "nf4" else 0,
    double_quant=double_quant and kind == "nf4",
    layer_shape=layer_shape,
    dtype=kernel.dtype,
  )


def dequantize(q: QuantizedArray) -> jax.Array:
  """The kernel ``q`` stands for: its logical shape (``[..., in, out]``) and dtype.

  Computed in float32 and cast to ``q.dtype``; works under ``jit`` (the step forms each weight
  when it needs it).

  Raises:
    TypeError: ``q`` is not a :class:`QuantizedArray`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import dequantize, quantize
    >>> w = jax.random.normal(jax.random.key(0), (128, 32))
    >>> q = quantize({"dense": {"kernel": w}}, ["dense"], kind="int8")["dense"]["kernel"]
    >>> q
    QuantizedArray(int8, shape=(128, 32), dtype=float32)
    >>> bool(jnp.all(jnp.abs(dequantize(q) - w) <= jnp.abs(w).max(0) / 254 + 1e-6))
    True
  """
  if not isinstance(q, QuantizedArray):
    raise TypeError(f"dequantize takes a QuantizedArray (from lora_jax.quantize), got {type(q)}")
  if q.kind == "int8":
    w = int8.dequantize(q.codes, q.absmax)
  else:
    w = jnp.swapaxes(nf4.dequantize_layers(q, q.codes, q.absmax, q.absmax2, q.offset), -1, -2)
  return w.astype(q.dtype)


def materialize(x):
  """``x`` itself, or :func:`dequantize` of it when it is quantized (for code that needs W)."""
  return dequantize(x) if isinstance(x, QuantizedArray) else x


def dequantize_tree(params):
  """``params`` with every :class:`QuantizedArray` dequantized (the plain model's tree)."""
  return jax.tree.map(materialize, params, is_leaf=is_quantized)
