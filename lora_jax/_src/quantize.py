"""QLoRA's frozen base: ``quantize`` linear kernels to NF4 (or int8), ``dequantize`` them back.

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

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src.layouts import KernelLayout
from lora_jax._src.layouts import default_layout
from lora_jax._src.rules import LoraRule
from lora_jax._src.rules import closest
from lora_jax._src.spec import ADAPTER_LEAVES
from lora_jax._src.spec import LORA_SPEC

KINDS = ("nf4", "int8")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts
ABSMAX_BLOCK = 256  # double quantization: block size of the absmaxes' own quantization
WEIGHT = "kernel"

# The 16 NormalFloat levels (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with
# an exact zero; as float32, the table bitsandbytes dequantizes with.
NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)
# A value goes to the level whose midpoint interval holds it; on a midpoint, to the lower one.
_NF4_BOUNDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)


def _dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), 256 sorted values.

  For exponent ``e = 0..6`` the midpoints of ``2^e`` equal steps over ``[0.1, 1]``, times
  ``10^(e-6)``, with both signs; then 0 and 1. Computed in float64 and rounded once, so an entry
  may be one float32 ulp from bitsandbytes' own (which rounds each step in float32).
  """
  values = [0.0, 1.0]
  for e in range(7):
    k = np.arange(2**e, dtype=np.float64)
    means = 0.1 + 0.9 * (k + 0.5) / 2**e
    values += list(10.0 ** (e - 6) * means) + list(-(10.0 ** (e - 6)) * means)
  return np.sort(np.array(values).astype(np.float32))


DYNAMIC_MAP = _dynamic_map()
_GRID = 65536
# The dynamic-map level nearest to each grid point -1 + 2 i / (_GRID - 1) (ties: the lower).
_GRID_LEVEL = np.searchsorted(
  (np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])).astype(np.float32),
  (np.float32(-1) + np.float32(2) * np.arange(_GRID, dtype=np.float32) / np.float32(_GRID - 1)),
  side="left",
).astype(np.uint8)


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


# ---------------------------------------------------------------------------------------------
# One layer's kernel.


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, int]:
  """Flat ``x`` zero-padded to whole blocks, as ``[blocks, block]``; and its length."""
  n = x.shape[0]
  blocks = -(-n // block)
  return jnp.pad(x, (0, blocks * block - n)).reshape(blocks, block), n


def _dynamic_codes(normed: jax.Array) -> jax.Array:
  """The dynamic-map index of each ``normed`` value in ``[-1, 1]``, as uint8.

  As bitsandbytes' CPU kernel: the value is rounded to one of 65,536 evenly spaced points of
  ``[-1, 1]`` and takes the level nearest to that point (the nearest level to the value itself,
  except within half a grid step, 1.5e-5, of a midpoint between two levels).
  """
  v = jnp.clip(normed, -1.0, 1.0)
  point = ((v + 1.0) * 0.5 * (_GRID - 1) + 0.5).astype(jnp.int32)
  return jnp.asarray(_GRID_LEVEL)[point]


def _absmax_quant(absmax: jax.Array, offset=None):
  """Double quantization of NF4 absmaxes: (uint8 codes, float32 absmax2, float32 offset).

  ``offset`` is the absmaxes' float32 mean; its last bit depends on the order of the sum, so
  bitsandbytes' (a PyTorch sum) may differ from ours by an ulp or two: tests pass theirs in.
  """
  offset = jnp.mean(absmax) if offset is None else jnp.asarray(offset, jnp.float32)
  blocks, n = _blocks(absmax - offset, ABSMAX_BLOCK)
  absmax2 = jnp.max(jnp.abs(blocks), axis=1)
  inverse = 1.0 / jnp.where(absmax2 > 0, absmax2, 1.0)
  codes = jnp.where(absmax2[:, None] > 0, _dynamic_codes(blocks * inverse[:, None]), 0)
  return codes.reshape(-1)[:n].astype(jnp.uint8), absmax2, offset


def _absmax_dequant(codes, absmax2, offset) -> jax.Array:
  n = codes.shape[-1]
  values = jnp.take(jnp.asarray(DYNAMIC_MAP), codes.astype(jnp.int32), axis=0)
  scale = jnp.repeat(absmax2, ABSMAX_BLOCK, axis=-1)[..., :n]
  return values * scale + offset[..., None]


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant"))
def _nf4_layer(kernel: jax.Array, block_size: int, double_quant: bool):
  # Blocks over the weight as transformers stores it: kernel.T ([out, in]), row-major.
  flat = kernel.T.astype(jnp.float32).reshape(-1)
  blocks, n = _blocks(flat, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.maximum(absmax, 1e-38)[:, None]
  # bitsandbytes multiplies whole blocks by 1/absmax, and divides a trailing partial block.
  partial = n % block_size != 0
  last = jnp.arange(blocks.shape[0])[:, None] == blocks.shape[0] - 1
  scaled = jnp.where(partial & last, blocks / safe, blocks * (1.0 / safe))
  scaled = jnp.clip(scaled, -1.0, 1.0).reshape(-1)[: n + n % 2]  # an odd count pads with 0
  idx = jnp.sum(scaled[:, None] > jnp.asarray(_NF4_BOUNDS), axis=1).astype(jnp.uint8)
  pairs = idx.reshape(-1, 2)
  codes = (pairs[:, 0] << 4) | pairs[:, 1]
  if not double_quant:
    return codes, absmax, None, None
  return codes, *_absmax_quant(absmax)


@jax.jit
def _int8_layer(kernel: jax.Array):
  w = kernel.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=0)
  scale = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  codes = jnp.clip(jnp.round(w * scale), -127, 127).astype(jnp.int8)
  return codes, absmax, None, None


def _quantize_kernel(kernel, stacked: int, kind: str, block_size: int, double_quant: bool):
  """A :class:`QuantizedArray` of ``kernel`` (``stacked`` leading layer axes), layer by layer."""
  shape = tuple(kernel.shape)
  layer_shape = shape[stacked:]

  def one(w):
    if kind == "nf4":
      return _nf4_layer(w, block_size, double_quant)
    return _int8_layer(w)

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


def _dequantize_layer_nf4(q: QuantizedArray, codes, absmax, absmax2, offset):
  """float32 ``[..., out, in]`` from one or more layers' NF4 children (leading axes kept)."""
  lead = codes.shape[:-1]
  out_features, in_features = q.layer_shape[1], q.layer_shape[0]
  n = in_features * out_features
  if q.double_quant:
    absmax = _absmax_dequant(absmax, absmax2, offset)
  idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*lead, -1)
  values = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32), axis=0)
  blocks = absmax.shape[-1]
  values = values[..., :n]
  values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, blocks * q.block_size - n)])
  w = values.reshape(*lead, blocks, q.block_size) * absmax[..., None]
  return w.reshape(*lead, -1)[..., :n].reshape(*lead, out_features, in_features)


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
    w = q.codes.astype(jnp.float32) * (q.absmax / 127.0)[..., None, :]
  else:
    w = jnp.swapaxes(_dequantize_layer_nf4(q, q.codes, q.absmax, q.absmax2, q.offset), -1, -2)
  return w.astype(q.dtype)


def materialize(x):
  """``x`` itself, or :func:`dequantize` of it when it is quantized (for code that needs W)."""
  return dequantize(x) if isinstance(x, QuantizedArray) else x


# ---------------------------------------------------------------------------------------------
# Running a module whose weight is quantized (lora_apply's low-rank path).

_RUNNABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _own_variables(module: nn.Module) -> dict:
  """The module's own params, adapters left out (the interceptor adds those)."""
  params = module.variables.get("params", {})
  adapter = (*ADAPTER_LEAVES, LORA_SPEC)
  return {k: v for k, v in params.items() if not isinstance(v, Mapping) and k not in adapter}


def holds_quantized(module: nn.Module) -> bool:
  """Whether ``module`` (bound) holds a quantized weight of its own."""
  return any(isinstance(v, QuantizedArray) for v in _own_variables(module).values())


def run_dequantized(module: nn.Module, method: str, *args, **kwargs):
  """``module.method(*args, **kwargs)`` with its quantized weights dequantized.

  A copy of the module runs on the dequantized weight; under ``jax.checkpoint``, so that the
  backward pass forms the weight again from the codes instead of keeping it (a scanned model
  would otherwise keep every layer's dequantized weights for the backward pass).
  """
  if not isinstance(module, _RUNNABLE) or method != "__call__":
    path = paths.join(paths.PARAMS, *module.scope.path)
    raise ValueError(
      f"module {path!r} ({type(module).__name__}.{method}) holds a quantized kernel, which "
      "lora_apply runs in nn.Dense, nn.DenseGeneral and nn.Einsum calls only"
    )
  plain = module.clone(parent=None)
  leaves, treedef = jax.tree.flatten((_own_variables(module), args, kwargs))
  traced = [isinstance(x, jax.Array | np.ndarray) for x in leaves]

  def run(arrays):
    it = iter(arrays)
    own, args, kwargs = jax.tree.unflatten(
      treedef, [next(it) if t else x for x, t in zip(leaves, traced, strict=True)]
    )
    params = {k: materialize(v) for k, v in own.items()}
    return plain.apply({"params": params}, *args, **kwargs)

  return jax.checkpoint(run)([x for x, t in zip(leaves, traced, strict=True) if t])


# ---------------------------------------------------------------------------------------------
# Which kernels: the targets of a LoraRule, kernels with one input and one output axis.


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
    rule = LoraRule(self.targets, rank=1, exclude=self.exclude)  # validates the spellings
    object.__setattr__(self, "targets", rule.pattern)
    object.__setattr__(self, "exclude", rule.exclude)
    if self.kind not in KINDS:
      raise ValueError(f"quantize kind={self.kind!r} is not one of {list(KINDS)}")
    if self.block_size not in BLOCK_SIZES or isinstance(self.block_size, bool):
      raise ValueError(f"quantize block_size={self.block_size!r} is not one of {list(BLOCK_SIZES)}")
    if not isinstance(self.double_quant, bool):
      raise ValueError(f"quantize double_quant={self.double_quant!r} must be True or False")

  @property
  def rule(self) -> LoraRule:
    return LoraRule(self.targets, rank=1, exclude=self.exclude)


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


def plan(params, quantization: Quantization, layouts=None) -> dict[str, KernelLayout]:
  """``{module path: layout}`` of the kernels ``quantization`` selects in ``params``.

  Every target must match some module (the closest paths are listed if not) and every matched
  module must hold a supported kernel.
  """
  tree, _ = paths.split_params(params)
  layouts = layouts if layouts is not None else {}
  rule = quantization.rule
  modules = [(p, m) for p, m in paths.iter_modules(tree) if _own_leaves(m)]
  chosen = {p: _check(p, m, layouts) for p, m in modules if rule.matches(p, _linear(p, m, layouts))}
  for target in rule.targets():
    probe = rule if len(rule.targets()) == 1 else LoraRule((target,), rank=1)
    if not any(probe.matches(p, _linear(p, m, layouts)) for p, m in modules):
      raise ValueError(
        f"quantize target {target!r} matches no module; closest module paths: "
        f"{closest(target, [p for p, _ in modules])}"
      )
  return chosen


def quantize_array(kernel, layout: KernelLayout, quantization: Quantization) -> QuantizedArray:
  """One kernel (array or ``jax.ShapeDtypeStruct``) quantized as ``quantization`` says."""
  return _quantize_kernel(
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
  return apply_quantization(
    params, Quantization(targets, kind, block_size, double_quant, exclude), layouts
  )


def apply_quantization(params, quantization: Quantization, layouts=None):
  """:func:`quantize` with its settings as one :class:`Quantization` value."""
  tree, rebuild = paths.split_params(params)
  chosen = plan(tree, quantization, layouts)

  def replace(path: str, module: dict) -> dict:
    if path not in chosen:
      return module
    return {**module, WEIGHT: quantize_array(module[WEIGHT], chosen[path], quantization)}

  return rebuild(paths.map_modules(replace, tree))


def has_quantized(params) -> bool:
  leaves = jax.tree.leaves(params, is_leaf=is_quantized)
  return any(isinstance(x, QuantizedArray) for x in leaves)


def dequantize_tree(params):
  """``params`` with every :class:`QuantizedArray` dequantized (the plain model's tree)."""
  return jax.tree.map(materialize, params, is_leaf=is_quantized)


def stack(parts: list[QuantizedArray]) -> QuantizedArray:
  """Layers quantized one by one, as one kernel with a leading layer axis (``nn.scan``)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
