"""How a module's weight splits into input and output axes.

An adapter factors a weight into ``A`` (its input axes x rank) and ``B`` (rank x its output
axes). For two-dimensional ``kernel`` and ``embedding`` leaves the split is read off the shape.
A kernel with more axes (``nn.DenseGeneral`` over attention heads, ``nn.Einsum``, ``nn.Conv``)
does not say which of its axes the module contracts with the input; :func:`kernel_layouts`
finds out by tracing the model once, shapes only, and :func:`lora_jax.lora_init` takes the
result as ``layouts=``.

Layers stacked by ``nn.scan`` store every weight with a leading layer axis (``[L, in, out]``);
:func:`kernel_layouts` sees each module once inside the scan and the stacked variables after
it, so it records how many leading axes are stacked (``stacked``) and ``lora_init`` gives such
weights stacked adapters (``lora_a [L, in, r]``, ``lora_b [L, r, out]``).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import flax.linen as nn
import jax

from lora_jax._src import paths


class KernelLayout(NamedTuple):
  """The split of one weight: ``in_axes`` are contracted with the input, ``out_axes`` produced.

  ``kind`` is ``"dense"`` (Dense, DenseGeneral), ``"einsum"``, ``"conv"`` or ``"embed"``.
  ``stacked`` leading axes (``nn.scan`` over layers) come before the axes that ``in_axes`` and
  ``out_axes`` count.
  """

  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  kind: str
  stacked: int = 0


SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)
SUPPORTED_NAMES = "nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed"


class UnsupportedLayout(ValueError):
  """The module's weight cannot be split into input and output axes."""


class Layouts(dict):
  """``{module path: KernelLayout}`` from :func:`kernel_layouts`, plus ``refused``: the modules
  it left out, ``{path: why}``, so that ``lora_init`` can say why a rule cannot adapt them."""

  def __init__(self, layouts=(), refused=None):
    super().__init__(layouts)
    self.refused = dict(refused or {})


def default_layout(weight_name: str, shape) -> KernelLayout | None:
  """The layout of a weight known from its name and shape alone, or ``None``."""
  if len(shape) != 2:
    return None
  return KernelLayout((0,), (1,), "embed" if weight_name == "embedding" else "dense")


def as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, tuple | list) else (x,)


def einsum_layout(equation: str) -> KernelLayout:
  """The layout of an einsum layer's kernel, from its equation ``"lhs,kernel->out"``."""
  eq = equation.replace(" ", "")
  m = re.fullmatch(r"([a-zA-Z.]*),([a-zA-Z]*)->([a-zA-Z.]*)", eq)
  if m is None:
    raise UnsupportedLayout(f"einsum {equation!r} is not of the form 'lhs,kernel->out'")
  lhs, rhs, out = m.groups()
  ins = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
  outs = tuple(i for i, c in enumerate(rhs) if c in out and c not in lhs)
  if len(ins) + len(outs) != len(rhs) or not ins or not outs:
    raise UnsupportedLayout(
      f"einsum {equation!r} does not split its kernel {rhs!r} into axes contracted "
      "with the input and axes of the output (a kernel axis shared with both, or with neither, "
      "cannot be factored by LoRA)"
    )
  return KernelLayout(ins, outs, "einsum")


def module_layout(module: nn.Module, ndim: int) -> KernelLayout:
  """The layout of ``module``'s weight (``ndim`` axes), from the module's own attributes."""
  if isinstance(module, nn.Embed):
    return KernelLayout((0,), (1,), "embed")
  if isinstance(module, nn.Dense):
    return KernelLayout((0,), (1,), "dense")
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise UnsupportedLayout(
        f"nn.DenseGeneral with batch_dims={module.batch_dims} is not supported by LoRA"
      )
    n_in = len(as_tuple(module.axis))
    return KernelLayout(tuple(range(n_in)), tuple(range(n_in, ndim)), "dense")
  if isinstance(module, nn.Einsum):
    return einsum_layout(module.einsum_str)
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1:
      raise UnsupportedLayout(
        f"nn.Conv with feature_group_count={module.feature_group_count} is not supported by LoRA"
      )
    return KernelLayout(tuple(range(ndim - 1)), (ndim - 1,), "conv")
  raise UnsupportedLayout(
    f"{type(module).__name__} is not supported by the low-rank path (supported: {SUPPORTED_NAMES})"
  )


def trace_layouts(module: nn.Module, *args, **kwargs) -> Layouts:
  """:func:`lora_jax.kernel_layouts` of a linen module: ``module.init`` traced, shapes only."""
  found: dict[str, tuple[str, KernelLayout]] = {}
  refused: dict[str, str] = {}

  def record(next_fun, fn_args, fn_kwargs, context):
    out = next_fun(*fn_args, **fn_kwargs)
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, SUPPORTED):
      name = "embedding" if isinstance(mod, nn.Embed) else "kernel"
      if mod.has_variable("params", name):
        ndim = mod.get_variable("params", name).ndim  # one layer's, inside nn.scan
        path = paths.join(paths.PARAMS, *mod.scope.path)
        try:
          found[path] = (name, module_layout(mod, ndim))
        except UnsupportedLayout as e:
          refused[path] = str(e)
    return out

  def init():
    with nn.intercept_methods(record):
      return module.init(jax.random.key(0), *args, **kwargs)

  variables = jax.eval_shape(init)
  out = {}
  for path, (name, layout) in found.items():
    node = variables
    for key in [*path.split("/"), name]:
      node = node[key]
    stacked = node.ndim - len(layout.in_axes) - len(layout.out_axes)
    out[path] = layout._replace(stacked=stacked)
  return Layouts(out, refused)
