"""Which kernels to quantize (:class:`Quantization`) and :func:`quantize` over a params tree.

The targets are spelled as a :class:`lora_jax.LoraRule`'s (a regex over module paths, PEFT-style
module names, ``"all-linear"``); only kernels with one input and one output axis per layer are
quantized, and a target that matches nothing, or a matched module that cannot be quantized, is
an error naming the path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax._src import paths
from lora_jax._src.layouts import KernelLayout
from lora_jax._src.layouts import default_layout
from lora_jax._src.targets import Targets
from lora_jax._src.targets import assign
from lora_jax.nnx import tree as nnx_tree
from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.kernel import quantize_kernel

KINDS = ("nf4", "int8")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts
WEIGHT = "kernel"


@dataclasses.dataclass(frozen=True)
class Quantization:
  """Which kernels to quantize, and how: :func:`quantize`'s arguments as one value.

  ``lora_jax.models.from_pretrained(..., quantize=Quantization("all-linear"))`` quantizes each
  matched kernel as it is read, so the checkpoint is never held unquantized whole.

  Args:
    targets: as :class:`lora_jax.LoraRule`'s ``pattern``: a regex over module paths, a list of
      PEFT-style module names, or ``"all-linear"`` (every linear kernel but the ``lm_head``).
    kind: ``"nf4"`` (4-bit NormalFloat, QLoRA) or ``"int8"`` (per output unit).
    block_size: values per NF4 block, one of 32, 64, ..., 4096 (NF4 only).
    double_quant: quantize NF4's block absmaxes to 8 bits too (NF4 only; QLoRA's default).
    exclude: modules never quantized, in the same spellings as ``targets`` (e.g. a task head
      that trains whole).

  Example:
    >>> from lora_jax import Quantization
    >>> Quantization("all-linear").kind
    'nf4'
    >>> Quantization("all-linear", kind="int4")
    Traceback (most recent call last):
    ...
    ValueError: quantize kind='int4' is not one of ['nf4', 'int8']
  """

  targets: Any
  kind: str = "nf4"
  block_size: int = 64
  double_quant: bool = True
  exclude: Any = None

  def __post_init__(self):
    selector = Targets(self.targets, self.exclude, owner="Quantization")
    object.__setattr__(self, "targets", selector.pattern)
    object.__setattr__(self, "exclude", selector.exclude)
    if self.kind not in KINDS:
      raise ValueError(f"quantize kind={self.kind!r} is not one of {list(KINDS)}")
    if self.block_size not in BLOCK_SIZES or isinstance(self.block_size, bool):
      raise ValueError(f"quantize block_size={self.block_size!r} is not one of {list(BLOCK_SIZES)}")
    if not isinstance(self.double_quant, bool):
      raise ValueError(f"quantize double_quant={self.double_quant!r} must be True or False")

  @property
  def selector(self) -> Targets:
    """The modules it reaches (``targets`` minus ``exclude``)."""
    return Targets(self.targets, self.exclude)


def _own_leaves(module: Mapping) -> dict:
  return {k: v for k, v in module.items() if not isinstance(v, Mapping)}


def _layout(path: str, module: Mapping, layouts: Mapping) -> KernelLayout | None:
  kernel = module.get(WEIGHT)
  if kernel is None or isinstance(kernel, Mapping):
    return None
  return layouts.get(path) or default_layout(WEIGHT, tuple(kernel.shape))


def _linear(path: str, module: Mapping, layouts: Mapping) -> bool:
  layout = _layout(path, module, layouts)
  return layout is not None and layout.kind in ("dense", "einsum")


def _check(path: str, module: Mapping, layouts: Mapping) -> KernelLayout:
  """The layout of a matched module's kernel, if quantize supports it; else a ValueError."""
  own = _own_leaves(module)
  kernel = own.get(WEIGHT)
  if kernel is None:
    what = "an embedding (embeddings stay unquantized)" if "embedding" in own else "no kernel"
    raise ValueError(
      f"quantize: module {path!r} matched the targets but holds {what}; its leaves: {sorted(own)}"
    )
  if isinstance(kernel, QuantizedArray):
    raise ValueError(f"quantize: {path}/kernel is already quantized ({kernel.describe()})")
  layout = _layout(path, module, layouts)
  if layout is None:
    if path in getattr(layouts, "refused", {}):
      raise ValueError(f"quantize: {path}/kernel cannot be quantized: {layouts.refused[path]}")
    raise ValueError(
      f"quantize: {path}/kernel has shape {tuple(kernel.shape)}: whether leading axes stack "
      "scanned layers is not known from the shape alone; pass "
      "layouts=lora_jax.kernel_layouts(model, *example_inputs)"
    )
  if layout.kind not in ("dense", "einsum") or (layout.in_axes, layout.out_axes) != ((0,), (1,)):
    raise ValueError(
      f"quantize: {path}/kernel of shape {tuple(kernel.shape)} ({layout.kind}, inputs "
      f"{layout.in_axes}, outputs {layout.out_axes} per layer) is not supported: only kernels "
      "with one input and one output axis per layer ([in, out], or [L, in, out] when scanned)"
    )
  if layout.stacked + 2 != len(kernel.shape):
    raise ValueError(f"quantize: layout {layout} does not fit {path}/kernel {tuple(kernel.shape)}")
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"quantize: {path}/kernel has dtype {kernel.dtype}, not a float dtype")
  return layout


def plan(
  params, quantization: Quantization, layouts=None, prefix: str = paths.PARAMS
) -> dict[str, KernelLayout]:
  """``{module path: layout}`` of the kernels ``quantization`` selects in ``params``.

  Every target must match some module (the closest paths are listed if not) and every matched
  module must hold a supported kernel.
  """
  tree, _ = paths.split_params(params)
  layouts = layouts if layouts is not None else {}
  modules = {p: m for p, m in paths.iter_modules(tree, prefix) if _own_leaves(m)}
  matched = assign(
    [(p, _linear(p, m, layouts)) for p, m in modules.items()],
    [quantization.selector],
    lambda _, target: f"quantize target {target!r}",
  )
  return {p: _check(p, modules[p], layouts) for p in matched}


def quantize_array(kernel, layout: KernelLayout, quantization: Quantization) -> QuantizedArray:
  """One kernel (array or ``jax.ShapeDtypeStruct``) quantized as ``quantization`` says."""
  return quantize_kernel(
    kernel,
    layout.stacked,
    quantization.kind,
    quantization.block_size,
    quantization.double_quant,
  )


def quantize(
  params,
  targets,
  *,
  kind: str = "nf4",
  block_size: int = 64,
  double_quant: bool = True,
  exclude=None,
  layouts: Mapping[str, KernelLayout] | None = None,
):
  """Returns ``params`` with the kernels ``targets`` select replaced by :class:`QuantizedArray` s.

  A pure transform, like :func:`lora_jax.lora_init` (before or after it): other leaves, and
  adapters, are kept as they are. NF4 follows QLoRA and bitsandbytes exactly (see the module
  docstring); int8 keeps one absmax per output unit. Run the result through
  :func:`lora_jax.lora_apply`; :func:`lora_jax.merge` dequantizes.

  Args:
    params: a variables dict or bare params tree (arrays or ``jax.ShapeDtypeStruct``).
    targets: a regex over module paths, a list of PEFT-style module names, or ``"all-linear"``
      (every linear kernel except an ``lm_head``), as :class:`lora_jax.LoraRule` takes them.
    kind: ``"nf4"`` or ``"int8"``.
    block_size: values per NF4 block (bitsandbytes' ``blocksize``; NF4 only).
    double_quant: also quantize NF4's absmaxes to 8 bits (bitsandbytes'
      ``compress_statistics``, QLoRA's double quantization; NF4 only).
    exclude: modules never quantized, in the spellings of ``targets``.
    layouts: from :func:`lora_jax.kernel_layouts`, needed for scanned (``[L, in, out]``)
      kernels.

  Raises:
    ValueError: a bad setting, a target matching nothing, or a matched module whose weight is
      not a float kernel with one input and one output axis per layer (embeddings, convolutions,
      multi-axis einsum kernels); the message names the path.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import quantize
    >>> model = nn.Dense(256)
    >>> x = jnp.ones((1, 512))
    >>> q = quantize(model.init(jax.random.key(0), x), ".*")
    >>> q["params"]["kernel"]
    QuantizedArray(nf4 block=64 dq, shape=(512, 256), dtype=float32)
    >>> codes, absmax, absmax2, offset = 512 * 256 // 2, 512 * 256 // 64, 4 * 8, 4  # bytes
    >>> q["params"]["kernel"].nbytes == codes + absmax + absmax2 + offset
    True
  """
  quantization = Quantization(targets, kind, block_size, double_quant, exclude)
  if nnx_tree.is_model(params):  # NNX: the model itself, its weights' values replaced
    known = {**nnx_tree.read_layouts(params), **(layouts or {})}
    return nnx_tree.replace_params(
      params, lambda tree: apply_quantization(tree, quantization, known, prefix="")
    )
  return apply_quantization(params, quantization, layouts)


def apply_quantization(params, quantization: Quantization, layouts=None, prefix=paths.PARAMS):
  """:func:`quantize` with its settings as one :class:`Quantization` value (``prefix``: that of
  a bare tree's module paths; ``""`` for an NNX model's)."""
  tree, rebuild = paths.split_params(params)
  chosen = plan(tree, quantization, layouts, prefix)

  def replace(path: str, module: dict) -> dict:
    if path not in chosen:
      return module
    return {**module, WEIGHT: quantize_array(module[WEIGHT], chosen[path], quantization)}

  return rebuild(paths.map_modules(replace, tree, prefix))
