"""An NNX model as the parameter tree lora_jax's core reads, and back.

The core (rules, specs, merge, reports, Orbax and PEFT I/O) works on nested dicts of module
parameters. :func:`to_variables` reads an NNX model into that form, ``{"params": {...}}``
keyed by attribute path (``layers/0/attn/query/kernel``; list indices as strings), with each
adapted module's static ``lora_spec`` beside its ``lora_a``/``lora_b``. Only ``nnx.Param``
variables (``nnx.LoRAParam`` included) are read: what PEFT counts as parameters. The writers
put a tree's values back into the model's own variables (:func:`write_values`) and add or
remove adapters (:func:`attach`, :func:`detach`), in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from lora_jax._src import paths
from lora_jax._src.layouts import Layouts
from lora_jax._src.layouts import UnsupportedLayout
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import LoraSpec
from lora_jax.nnx.layouts import SUPPORTED
from lora_jax.nnx.layouts import SUPPORTED_NAMES
from lora_jax.nnx.layouts import module_layout
from lora_jax.nnx.layouts import weight_name
from lora_jax.nnx.modules import ADAPTER_ATTRIBUTES
from lora_jax.nnx.modules import DROPOUT
from lora_jax.nnx.modules import Adapted
from lora_jax.nnx.modules import adapted_class
from lora_jax.nnx.modules import base_class
from lora_jax.nnx.modules import holds_quantized
from lora_jax.nnx.modules import own_params


def is_model(x: Any) -> bool:
  """Whether ``x`` is a Flax NNX module (rather than a linen parameter tree)."""
  return isinstance(x, nnx.Module)


def refuse_nnx(x: Any, what: str, instead: str) -> None:
  """A linen-only function given an NNX model or state: one line saying what to call instead."""
  if is_model(x) or isinstance(x, nnx.State):
    kind = "an NNX model" if is_model(x) else "an nnx.State"
    raise TypeError(f"{what} takes a linen parameter tree, not {kind}: use {instead}")


def modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{"a/b/c": module}`` for every module of ``model`` (the root is ``""``)."""
  return {"/".join(str(k) for k in path): m for path, m in nnx.iter_modules(model)}


def adapted(model: nnx.Module) -> dict[str, nnx.Module]:
  """The modules of ``model`` that carry an adapter."""
  return {
    p: m for p, m in modules(model).items() if isinstance(getattr(m, LORA_SPEC, None), LoraSpec)
  }


def to_variables(model: nnx.Module) -> dict:
  """``{"params": tree}``: every ``nnx.Param`` value of ``model`` by attribute path, with each
  adapted module's ``lora_spec``. Arrays are shared, not copied."""
  flat = {}
  for path, module in modules(model).items():
    for name, var in own_params(module).items():
      flat[paths.join(paths.PARAMS, path, name)] = var.get_value()
    spec = getattr(module, LORA_SPEC, None)
    if isinstance(spec, LoraSpec):
      flat[paths.join(paths.PARAMS, path, LORA_SPEC)] = spec
  return {paths.PARAMS: paths.nest(flat)}


def as_variables(params: Any) -> Any:
  """``params`` itself, or :func:`to_variables` of an NNX model."""
  return to_variables(params) if is_model(params) else params


def module_leaves(variables: Mapping, path: str) -> Mapping:
  node = variables[paths.PARAMS]
  for key in path.split("/") if path else ():
    node = node[key]
  return node


def write_values(model: nnx.Module, variables: Mapping) -> None:
  """Sets each ``nnx.Param`` of ``model`` that ``variables`` holds (by path) to that value."""
  flat = paths.flatten(variables[paths.PARAMS])
  for path, module in modules(model).items():
    for name, var in own_params(module).items():
      new = flat.get(paths.join(paths.PARAMS, path, name))
      if new is not None and new is not var.get_value():
        var.set_value(new)


def dropout_stream(rngs: nnx.Rngs | None):
  """The stream LoRA dropout draws from: ``"lora_dropout"``, else ``"dropout"``, else the
  default stream of ``rngs``; ``None`` without ``rngs``."""
  if rngs is None:
    return None
  for name in (DROPOUT, "dropout"):
    if name in rngs:
      return rngs[name]
  return rngs["default"]


def attach(module: nnx.Module, leaves: Mapping, rngs: nnx.Rngs | None) -> None:
  """Gives ``module`` the adapter in ``leaves`` (``lora_a``, ``lora_b``, ``lora_spec``, DoRA's
  ``lora_magnitude``), replacing any it had, and the adapted class."""
  detach(module)
  spec: LoraSpec = leaves[LORA_SPEC]
  module.__class__ = adapted_class(type(module))
  setattr(module, LORA_SPEC, spec)
  setattr(module, LORA_A, nnx.LoRAParam(leaves[LORA_A]))
  setattr(module, LORA_B, nnx.LoRAParam(leaves[LORA_B]))
  if spec.use_dora:
    setattr(module, LORA_MAGNITUDE, nnx.LoRAParam(leaves[LORA_MAGNITUDE]))
  if spec.dropout > 0.0:
    stream = dropout_stream(rngs)
    if stream is None or not spec.stacked:
      setattr(module, DROPOUT, nnx.Dropout(spec.dropout, rngs=stream))
    else:  # layers stacked by nnx.vmap: one key per layer, sliced by nnx.scan as the weights are
      drop = nnx.Dropout(spec.dropout)
      shape = tuple(leaves[LORA_A].shape[: spec.stacked])
      drop.rngs = stream.fork().split(shape if len(shape) > 1 else shape[0])
      setattr(module, DROPOUT, drop)


def detach(module: nnx.Module) -> None:
  """Removes ``module``'s adapter, if any; it keeps the adapted class only while it holds a
  quantized weight."""
  for name in ADAPTER_ATTRIBUTES:
    if name in vars(module):
      delattr(module, name)
  if isinstance(module, Adapted) and not holds_quantized(module):
    module.__class__ = base_class(type(module))


def sync(model: nnx.Module, variables: Mapping, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """Makes ``model`` hold ``variables``: their values, and their adapters where they differ."""
  for path, module in modules(model).items():
    try:
      leaves = module_leaves(variables, path)
    except KeyError:
      continue
    spec = leaves.get(LORA_SPEC) if isinstance(leaves, Mapping) else None
    if spec is None and isinstance(module, Adapted) and LORA_SPEC in vars(module):
      detach(module)
    elif spec is not None and getattr(module, LORA_SPEC, None) != spec:
      attach(module, leaves, rngs)
  write_values(model, variables)
  for module in modules(model).values():
    if holds_quantized(module):
      module.__class__ = adapted_class(type(module))
  return model


def replace_params(model: nnx.Module, fn) -> nnx.Module:
  """Runs ``fn`` (bare params tree -> bare params tree, module paths without ``params/``) on
  the model's parameters and makes ``model`` hold the result, in place."""
  return sync(model, {paths.PARAMS: fn(to_variables(model)[paths.PARAMS])})


def read_layouts(model: nnx.Module) -> Layouts:
  """``{module path: KernelLayout}`` of every supported module of ``model``, read off its own
  attributes (no tracing); ``refused`` says why the other weight-holding modules cannot carry
  an adapter."""
  found, refused = {}, {}
  for path, module in modules(model).items():
    own = own_params(module)
    if not isinstance(module, SUPPORTED):
      if "kernel" in own or "embedding" in own:
        refused[path] = (
          f"{type(module).__name__} is not supported by lora_jax.nnx (supported: {SUPPORTED_NAMES})"
        )
      continue
    weight = own.get(weight_name(module))
    if weight is None:
      continue
    try:
      found[path] = module_layout(module, len(weight.shape))
    except UnsupportedLayout as e:
      refused[path] = f"{type(module).__name__}: {e}"
  return Layouts(found, refused)
