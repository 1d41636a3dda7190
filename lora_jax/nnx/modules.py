"""Adapted NNX modules: a flax layer that also runs its adapter on the low-rank path.

:func:`lora_jax.nnx.lora_init` does not wrap or copy a matched module: it adds the adapter's
variables to the module object itself (``lora_a``, ``lora_b``, DoRA's ``lora_magnitude``, all
``nnx.LoRAParam``; a static ``lora_spec``; an ``nnx.Dropout`` named ``lora_dropout`` when the
rule has dropout) and gives it a subclass of its own class (:func:`adapted_class`) whose
``__call__`` (and ``attend``, for ``nnx.Embed``) adds the adapter's contribution to the layer's
own output::

  y = layer(x) + scale * (dropout(x) @ A) @ B

The base weight enters only through the layer's own computation, so differentiating with
respect to ``nnx.LoRAParam`` forms no weight-sized gradient. The module keeps its identity, its
attribute path and its base variables; ``isinstance(module, nnx.Linear)`` stays true, and
``nnx.split`` / ``nnx.merge`` / ``nnx.jit`` carry the subclass in the graph definition.

A module whose weight is quantized (:func:`lora_jax.quantize` on an NNX model) gets the same
subclass, adapter or not: its layer runs on the dequantized weight, formed inside the call.
"""

from __future__ import annotations

import contextlib

from flax import nnx

from lora_jax._src import dora
from lora_jax._src import low_rank
from lora_jax._src.layouts import as_tuple
from lora_jax._src.layouts import einsum_layout
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import LoraSpec
from lora_jax.nnx.layouts import SUPPORTED
from lora_jax.nnx.layouts import SUPPORTED_NAMES
from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.kernel import materialize

DROPOUT = "lora_dropout"  # the nnx.Dropout submodule, and the rng stream it prefers
ADAPTER_ATTRIBUTES = (LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SPEC, DROPOUT)


def own_params(module: nnx.Module) -> dict[str, nnx.Variable]:
  return {k: v for k, v in vars(module).items() if isinstance(v, nnx.Param)}


def holds_quantized(module: nnx.Module) -> bool:
  """Whether one of the module's own weights holds a :class:`lora_jax.QuantizedArray`."""
  return any(isinstance(v.get_value(), QuantizedArray) for v in own_params(module).values())


@contextlib.contextmanager
def _dequantized(module: nnx.Module):
  """Within the block, the module's quantized weights hold their dequantized values."""
  held = {k: v for k, v in own_params(module).items() if isinstance(v.get_value(), QuantizedArray)}
  codes = {k: v.get_value() for k, v in held.items()}
  try:
    for k, v in held.items():
      v.set_value(materialize(codes[k]))
    yield
  finally:
    for k, v in held.items():
      v.set_value(codes[k])


class Adapted(nnx.Module):
  """The mixin of every adapted class: the layer's own output plus its adapter's.

  An ``nnx.Module`` itself, so that an adapted class keeps its layer class's memory layout
  and a module's class can be swapped in place."""

  def __call__(self, inputs, *args, **kwargs):
    with _dequantized(self):
      base = super().__call__(inputs, *args, **kwargs)
    spec: LoraSpec | None = getattr(self, LORA_SPEC, None)
    if spec is None:  # quantized, not adapted
      return base
    a, b = self.lora_a[...], self.lora_b[...]
    if isinstance(self, nnx.Embed):
      return base + low_rank.embed_lookup(inputs, a, b, spec, base.dtype).astype(base.dtype)
    x = self._lora_dropped(inputs)
    if isinstance(self, nnx.Einsum):
      lora = self._lora_einsum(x, a, b, spec, base.dtype, args, kwargs)
    elif isinstance(self, nnx.Conv):
      lora = self._lora_conv(x, a, b, spec, base.dtype)
    else:
      lora = low_rank.dense(x, a, b, spec, base.dtype, self._lora_input_axes())
    if spec.use_dora:
      return self._lora_dora(base, inputs, x, lora, spec)
    return base + lora.astype(base.dtype)

  def attend(self, query, *args, **kwargs):
    if not isinstance(self, nnx.Embed):
      raise AttributeError(f"{type(self).__name__} has no attend method")
    with _dequantized(self):
      base = super().attend(query, *args, **kwargs)
    spec: LoraSpec | None = getattr(self, LORA_SPEC, None)
    if spec is None:
      return base
    lora = low_rank.embed_attend(query, self.lora_a[...], self.lora_b[...], spec, base.dtype)
    return base + lora.astype(base.dtype)

  def _lora_dropped(self, x):
    drop = getattr(self, DROPOUT, None)
    return x if drop is None else drop(x)

  def _lora_input_axes(self) -> tuple[int, ...]:
    return (-1,) if isinstance(self, nnx.Linear) else as_tuple(self.axis)

  def _lora_einsum(self, x, a, b, spec: LoraSpec, dtype, args, kwargs):
    eq = kwargs.get("einsum_str") or (args[0] if args else None) or self.einsum_str
    layout = einsum_layout(eq)
    if (layout.in_axes, layout.out_axes) != (spec.in_axes, spec.out_axes):
      raise ValueError(
        f"an adapted nnx.Einsum was called with einsum_str={eq!r}, which contracts its kernel's "
        f"axes {layout.in_axes} (outputs {layout.out_axes}), but its adapter was made for "
        f"inputs {spec.in_axes} and outputs {spec.out_axes} ({self.einsum_str!r})"
      )
    return low_rank.einsum(eq, x, a, b, spec, dtype)

  def _lora_conv(self, x, a, b, spec: LoraSpec, dtype):
    # A is a convolution with the layer's own window, strides, padding and dilations into
    # `rank` channels (an nnx.Conv whose kernel is A); B the 1x1 convolution back.
    conv_a = nnx.Conv(
      self.in_features,
      spec.rank,
      self.kernel_size,
      strides=self.strides,
      padding=self.padding,
      input_dilation=self.input_dilation,
      kernel_dilation=self.kernel_dilation,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=a.dtype,
      precision=self.precision,
      kernel_init=lambda *_: a,
      rngs=nnx.Rngs(0),
    )
    return low_rank.matmul(conv_a(x).astype(dtype) * spec.scale, b.astype(dtype))

  def _lora_dora(self, base, inputs, x, lora, spec: LoraSpec):
    """DoRA as the linen path's (:mod:`lora_jax._src.dora`): ``base + (m/n - 1) W x +
    (m/n) lora``, ``W x`` on the dropped-out input when LoRA dropout is active."""
    w = materialize(self.kernel.get_value())
    r = dora.ratio(spec, w, self.lora_a[...], self.lora_b[...], self.lora_magnitude[...])
    if x is not inputs:  # dropout active: W x on the dropped-out input
      axes = self._lora_input_axes()
      x = low_rank.contracted_last(x.astype(base.dtype), axes)
      w_x = low_rank.matmul(x, w.astype(base.dtype), len(axes))
    elif self.bias is not None:
      w_x = base - self.bias[...].astype(base.dtype)
    else:
      w_x = base
    return dora.output(base, w_x, lora, r)


_CLASSES: dict[type, type] = {}


def adapted_class(cls: type) -> type:
  """The adapted subclass of an NNX layer class (one per class, made once)."""
  if issubclass(cls, Adapted):
    return cls
  if not issubclass(cls, SUPPORTED):
    raise ValueError(f"{cls.__name__} is not supported by lora_jax.nnx ({SUPPORTED_NAMES})")
  if cls not in _CLASSES:
    name = f"Adapted{cls.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name}
    _CLASSES[cls] = type(name, (Adapted, cls), namespace)
  return _CLASSES[cls]


def base_class(cls: type) -> type:
  """The layer class an adapted class was made from (``cls`` itself if it is not one)."""
  if issubclass(cls, Adapted):
    return next(c for c in cls.__mro__[1:] if not issubclass(c, Adapted))
  return cls
