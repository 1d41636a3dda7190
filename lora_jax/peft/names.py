"""Flax module paths <-> a PyTorch model's names: the mapping PEFT's files are written in.

PEFT names an adapted module by its name in the PyTorch model (``base_model.model.<module>``)
and stores ``modules_to_save`` tensors under that model's parameter names and layouts. The
core cannot know those for every model, so it asks a :class:`NameMapping`:

* ``config=None``: :class:`FlaxNames`, the Flax path with ``/`` -> ``.`` and Flax leaf names
  and layouts (round-trips; suits PyTorch models named like the Flax one);
* a :class:`NameMapping` of your own, for your own model;
* a transformers config: the mapping that the model family of ``config.model_type`` registered
  with :func:`register`. :mod:`lora_jax.models` registers its families (BERT, RoBERTa, Llama,
  Mistral, Qwen2, Qwen3) when it is imported; a package can also announce a module that
  registers its own in the ``lora_jax.name_mappings`` entry-point group, loaded on first need.

Example:
  A mapping for a model whose PyTorch twin calls ``dense`` ``fc``:

  >>> import numpy as np
  >>> class MyNames:
  ...   layers = None
  ...   def module_name(self, path): return path.replace("dense", "fc").replace("/", ".")
  ...   def module_path(self, name): return name.replace("fc", "dense").replace(".", "/")
  ...   def to_torch(self, tree): return {}
  ...   def from_torch(self, tensors): return {}
  >>> isinstance(MyNames(), NameMapping)
  True
  >>> names_for(MyNames(), {}).module_name("block/dense")
  'block.fc'
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Protocol
from typing import runtime_checkable

import numpy as np

from lora_jax._src import paths
from lora_jax._src import stacking
from lora_jax._src.spec import LoraSpec

ENTRY_POINTS = "lora_jax.name_mappings"

Factory = Callable[[Any, Mapping], "NameMapping"]
_REGISTRY: dict[str, Factory] = {}
_entry_points_loaded = False


@runtime_checkable
class NameMapping(Protocol):
  """How one model's Flax module paths (no ``params/``) read in its PyTorch twin.

  Attributes:
    layers: the module path holding one submodule per layer (``"model/layers"``) that a
      scanned model stacks on a leading axis, or ``None``; PEFT names each layer's modules, so
      stacked adapters are split per layer on export and stacked again on import.
  """

  layers: str | None

  def module_name(self, path: str) -> str:
    """``"encoder/layer/0/attention/self/query"`` -> the PyTorch module name."""

  def module_path(self, name: str) -> str:
    """The inverse of :meth:`module_name`."""

  def to_torch(self, tree: Mapping) -> dict[str, np.ndarray]:
    """A nested params tree (per layer) -> ``{PyTorch parameter name: array}``, in PyTorch's
    layouts (a Linear's ``weight`` is ``[out, in]``)."""

  def from_torch(self, tensors: Mapping[str, np.ndarray]) -> dict:
    """The inverse of :meth:`to_torch`: a nested params tree of numpy arrays."""


class FlaxNames:
  """The Flax names themselves: ``a/b/c`` is module ``a.b.c``, leaves keep names and layouts."""

  layers = None

  def __init__(self, tree: Mapping = ()):
    dotted = [p for p in paths.flatten(dict(tree)) if "." in p]
    if dotted:
      raise ValueError(
        f"parameter paths {dotted[:5]} contain '.', which PEFT uses as its separator; pass "
        "config= (a transformers config) to name them, or rename the modules"
      )

  def module_name(self, path: str) -> str:
    return path.replace("/", ".")

  def module_path(self, name: str) -> str:
    return name.replace(".", "/")

  def to_torch(self, tree: Mapping) -> dict[str, np.ndarray]:
    return {
      self.module_name(p.removeprefix(paths.PARAMS + "/")): np.asarray(v)
      for p, v in paths.flatten(tree).items()
    }

  def from_torch(self, tensors: Mapping[str, np.ndarray]) -> dict:
    return paths.nest(
      {paths.join(paths.PARAMS, self.module_path(k)): v for k, v in tensors.items()}
    )


def register(model_types: Sequence[str], factory: Factory) -> None:
  """Names models of these transformers ``model_type`` s with ``factory(config, tree)``.

  ``tree`` is the bare params tree being exported or imported into (e.g. to tell a
  ``*ForSequenceClassification`` model from the bare encoder).
  """
  for model_type in model_types:
    _REGISTRY[model_type] = factory


def _load_entry_points() -> None:
  global _entry_points_loaded
  if not _entry_points_loaded:
    _entry_points_loaded = True
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
      entry.load()


def names_for(config: Any, tree: Mapping) -> NameMapping:
  """The :class:`NameMapping` for ``config`` (see the module docstring) and the params ``tree``.

  Raises:
    ValueError: a config whose ``model_type`` no family registered (the registered ones are
      listed), or Flax paths that contain ``.``.
  """
  if config is None:
    return FlaxNames(tree)
  if isinstance(config, NameMapping):
    return config
  model_type = getattr(config, "model_type", None)
  if model_type not in _REGISTRY:
    _load_entry_points()
  if model_type not in _REGISTRY:
    raise ValueError(
      f"config= has model_type {model_type!r}, for which no model family registered PEFT "
      f"names; registered: {sorted(_REGISTRY)}; pass a lora_jax.peft.NameMapping for your own "
      "model, or config=None to use the Flax names"
    )
  return _REGISTRY[model_type](config, tree)


def stacked_layers(tree: Mapping, names: NameMapping) -> str | None:
  """The container of ``tree``'s scanned (stacked) layers, or ``None`` if they are per layer."""
  if names.layers is None or not stacking.is_stacked(tree, names.layers):
    return None
  return names.layers


def per_layer(tree: Mapping, names: NameMapping) -> Mapping:
  """``tree`` with scanned layers split per layer (PEFT names each layer's modules)."""
  container = stacked_layers(tree, names)
  if container is not None:
    return stacking.unstack_layers(tree, container)
  stacked = sorted(
    paths.module_of(p)
    for p, v in paths.flatten(tree).items()
    if isinstance(v, LoraSpec) and v.stacked > 0
  )
  if stacked:
    raise ValueError(
      f"the adapters at {stacked[:5]} are stacked (scanned layers); PEFT names each layer's "
      "modules, so pass config= (the model's transformers config) or unstack_layers first"
    )
  return tree
