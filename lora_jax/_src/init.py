"""``lora_init``: add adapter leaves beside the weights that the rules select."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from lora_jax._src import dora
from lora_jax._src import paths
from lora_jax._src import svd_init
from lora_jax._src.layouts import KernelLayout
from lora_jax._src.layouts import default_layout
from lora_jax._src.rules import LoraRule
from lora_jax._src.rules import as_rules
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import WEIGHT_NAMES
from lora_jax._src.spec import LoraSpec
from lora_jax._src.targets import assign
from lora_jax.nnx import tree as nnx_tree
from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.kernel import materialize


def _weight_name(module: Mapping) -> str | None:
  for name in WEIGHT_NAMES:
    if name in module and not isinstance(module[name], Mapping):
      return name
  return None


def _own_leaves(module: Mapping) -> list[str]:
  return [k for k, v in module.items() if not isinstance(v, Mapping)]


def _is_linear(module: Mapping, layout: KernelLayout | None) -> bool:
  if "kernel" not in module or isinstance(module["kernel"], Mapping):
    return False
  if layout is not None:
    return layout.kind in ("dense", "einsum")
  return len(module["kernel"].shape) == 2


def _check_all_linear_layouts(modules, rules, layouts) -> None:
  """``"all-linear"`` cannot tell a linear kernel of more than two axes (``DenseGeneral``,
  ``Einsum``, scanned layers) from a convolution by its shape: such kernels are refused, not
  skipped, until their layouts are known."""
  unknown = [
    f"{p}/kernel {tuple(m['kernel'].shape)}"
    for p, m in modules
    if "kernel" in m
    and not isinstance(m["kernel"], Mapping)
    and len(m["kernel"].shape) > 2
    and p not in layouts
    and any(r.all_linear and r.matches(p, True) for r in rules)
  ]
  if unknown:
    raise ValueError(
      f"LoraRule('all-linear') reaches kernels of more than two axes whose inputs and outputs "
      f"are not known from their shapes ({', '.join(unknown[:3])}"
      f"{', ...' if len(unknown) > 3 else ''}; multi-axis Dense, Einsum, scanned layers or "
      "convolutions): pass layouts=lora_jax.kernel_layouts(model, *example_inputs), or exclude="
      "them"
    )


def _assign(params, rules, layouts, prefix: str) -> dict[str, LoraRule]:
  """Maps each adapted module path to the first rule that matches it; checks every target hits."""
  owned = [(p, m) for p, m in paths.iter_modules(params, prefix) if _own_leaves(m)]
  _check_all_linear_layouts(owned, rules, layouts)
  modules = [(p, _is_linear(m, layouts.get(p))) for p, m in owned]
  chosen = assign(
    modules,
    [rule.selector for rule in rules],
    lambda i, target: f"LoRA rule target {target!r} (rule {rules[i].describe()})",
  )
  return {path: rules[i] for path, i in chosen.items()}


def _spec_for(path: str, module: Mapping, rule: LoraRule, layouts) -> LoraSpec:
  name = _weight_name(module)
  if name is None:
    raise ValueError(
      f"module {path!r} matched rule {rule.describe()} but holds no supported weight "
      f"(one of {list(WEIGHT_NAMES)}); its leaves: {_own_leaves(module)}"
    )
  if LORA_SPEC in module:
    raise ValueError(f"module {path!r} already has an adapter; merge it before adding another")
  shape = tuple(module[name].shape)
  layout = layouts.get(path) or default_layout(name, shape)
  if layout is None and path in getattr(layouts, "refused", {}):
    raise ValueError(
      f"module {path!r} matched rule {rule.describe()} but cannot carry an adapter: "
      f"{layouts.refused[path]}"
    )
  if layout is None:
    raise ValueError(
      f"{path}/{name} has shape {shape}: which of its axes are inputs and which outputs (and "
      "whether leading axes stack scanned layers) is not known from the shape alone; pass "
      "layouts=lora_jax.kernel_layouts(model, *example_inputs)"
    )
  axes = sorted(layout.in_axes + layout.out_axes)
  if layout.stacked + len(axes) != len(shape) or axes != list(range(len(axes))):
    raise ValueError(f"layout {layout} for {path!r} does not fit weight shape {shape}")
  if rule.use_dora and layout.kind != "dense":
    raise ValueError(
      f"module {path!r} matched rule {rule.describe()} with use_dora=True, but its weight is "
      f"of kind {layout.kind!r}; DoRA supports linear kernels only (nn.Dense, nn.DenseGeneral): "
      "exclude it from the DoRA rule (exclude=...) or give it a rule without use_dora"
    )
  layer = shape[layout.stacked :]
  n_in = math.prod(layer[i] for i in layout.in_axes)
  n_out = math.prod(layer[o] for o in layout.out_axes)
  # Ranks up to min(inputs, outputs) add expressiveness; the LoRA write-ups still use ranks
  # above it on small heads (r=32 on a 128 -> 10 layer), so only ranks that exceed both sides,
  # where neither factor can be of full rank, are refused.
  if rule.rank > max(n_in, n_out):
    raise ValueError(
      f"rank {rule.rank} (rule {rule.describe()}) exceeds what {path}/{name} of shape {shape} "
      f"allows: max(inputs={n_in}, outputs={n_out}) = {max(n_in, n_out)}"
    )
  spec = LoraSpec(
    rank=rule.rank,
    alpha=rule.effective_alpha,
    rslora=rule.rslora,
    dropout=rule.dropout,
    weight=name,
    in_axes=layout.in_axes,
    out_axes=layout.out_axes,
    rule=rule.describe(),
    stacked=layout.stacked,
    init=rule.init,
    use_dora=rule.use_dora,
  )
  if svd_init.is_svd_init(spec.init):
    if isinstance(module[name], QuantizedArray):
      raise ValueError(
        f"{path}/{name} is quantized, and init={spec.init!r} rewrites the weight it starts from; "
        "run lora_init on the float base first, then lora_jax.quantize the residual weights"
      )
    svd_init.check(path, spec, shape)
  return spec


def _factors(spec: LoraSpec, init: str, weight, key):
  """LoRA's initialisation: one factor random, the other zero, so ``A @ B == 0``."""
  a_shape, b_shape = spec.a_shape(weight.shape), spec.b_shape(weight.shape)
  if isinstance(weight, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(a_shape, jnp.float32), jax.ShapeDtypeStruct(b_shape, jnp.float32)
  if spec.weight == "embedding":
    # As PEFT does for embeddings: A (looked up by token) zero, B random.
    return jnp.zeros(a_shape, jnp.float32), jax.random.normal(key, b_shape, jnp.float32)
  if init == "gaussian":
    a = jax.random.normal(key, a_shape, jnp.float32) / spec.rank
  else:  # kaiming_uniform with a=sqrt(5), torch's nn.Linear default that PEFT uses
    bound = 1.0 / math.sqrt(math.prod(a_shape[spec.stacked : -1]))  # fan-in of one layer
    a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
  return a, jnp.zeros(b_shape, jnp.float32)


def lora_init(params, rules, *, rng, layouts: Mapping[str, KernelLayout] | None = None):
  """Returns a copy of ``params`` with LoRA factors beside every weight the rules select.

  Each adapted module gains ``lora_a`` and ``lora_b`` (float32, whatever the weight's dtype)
  and a static ``lora_spec`` that :func:`merge` and :func:`lora_apply` read. ``B`` starts at
  zero, so a fresh adapter changes no output. The input tree is not modified. With
  ``init="pissa"``, ``"pissa_niter_K"`` or ``"olora"`` both factors come from the weight, which
  is replaced by the residual ``W - s*A@B`` (in its own dtype): outputs are unchanged too.

  Args:
    params: a Flax variables dict (``{"params": ...}``; other collections are kept as they are)
      or a bare params tree. Leaves may be arrays or ``jax.ShapeDtypeStruct``.
    rules: a :class:`LoraRule` or a list of them; for each module, the first match wins.
    rng: a ``jax.random`` key for the random factors.
    layouts: ``{module path: KernelLayout}`` for weights with more than two axes, as returned
      by :func:`kernel_layouts`.

  Raises:
    ValueError: a rule target matches no module (the closest paths are listed), a matched module
      has no ``kernel``/``embedding``, a rank exceeds the weight's, or a layout is unknown.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init
    >>> model = nn.Dense(16)
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 32)))
    >>> adapted = lora_init(variables, LoraRule(".*", rank=4), rng=jax.random.key(1))
    >>> adapted["params"]["lora_a"].shape, adapted["params"]["lora_b"].shape
    ((32, 4), (4, 16))
  """
  nnx_tree.refuse_nnx(params, "lora_init", "lora_jax.nnx.lora_init(model, rules, rngs=...)")
  tree, rebuild = paths.split_params(params)
  return rebuild(init_tree(tree, rules, rng=rng, layouts=layouts))


def init_tree(tree, rules, *, rng, layouts=None, prefix: str = paths.PARAMS) -> dict:
  """:func:`lora_init` on a bare params tree whose module paths start with ``prefix``
  (``""`` for Flax NNX models, whose paths are their attribute paths)."""
  rules = as_rules(rules)
  layouts = layouts if layouts is not None else {}
  chosen = _assign(tree, rules, layouts, prefix)
  specs = {}
  for path, module in paths.iter_modules(tree, prefix):
    if path in chosen:
      specs[path] = _spec_for(path, module, chosen[path], layouts)
  keys = dict(zip(specs, jax.random.split(rng, max(len(specs), 1)), strict=False))

  def add(path: str, module: dict) -> dict:
    spec = specs.get(path)
    if spec is None:
      return module
    if svd_init.is_svd_init(spec.init):  # factors from W; W becomes the residual
      a, b, weight = svd_init.factors(spec, module[spec.weight], keys[path])
      module = {**module, spec.weight: weight}
    else:
      a, b = _factors(spec, chosen[path].init, module[spec.weight], keys[path])
    out = {**module, LORA_A: a, LORA_B: b, LORA_SPEC: spec}
    if spec.use_dora:  # m = ||W + s A B|| per output unit, so that W' = W + s A B at step 0
      w = out[spec.weight]
      if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(w)):
        w = materialize(w)  # a QLoRA base: the norm of the dequantized weight
      out[LORA_MAGNITUDE] = dora.init_magnitude(spec, w, a, b)
    return out

  return paths.map_modules(add, tree, prefix)
