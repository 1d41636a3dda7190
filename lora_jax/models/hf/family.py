"""A model family: how its Flax module is built and how transformers names its weights.

Each family (``lora_jax.models.encoder.names.ENCODERS``, ``lora_jax.models.decoder.names
.DECODERS``) is a :class:`Family` instance, registered by ``model_type`` with
:func:`register`; :func:`family_of` finds a config's. The shared rules (a Linear's ``weight``
is a Flax ``kernel``, stored transposed; per-layer tensors stacked for scanned layers) live in
:mod:`lora_jax.models.hf.convert`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

# Flax leaf name -> the last part of its transformers name, in every family.
HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


class Family(abc.ABC):
  """One model family: subclass it, fill in the attributes and methods, :func:`register` it.

  Attributes:
    name: a word for messages (``"encoder"``).
    model_types: transformers ``model_type`` s it implements.
    default_task: the task when none is given.
    layers: the module path of per-layer modules that scanned layers stack, or ``None``.
    base_prefix: ``model_type`` -> the base model's attribute (``"bert"``), if any.
    classifies: whether its models take ``num_labels`` (sequence classification).
  """

  name: str
  model_types: tuple[str, ...]
  default_task: str
  layers: str | None = None
  base_prefix: Mapping[str, str] = {}
  classifies: bool = False

  @abc.abstractmethod
  def build(self, config: Any, task: str | None, **options) -> Any:
    """The Flax module (options: ``dtype``, ``param_dtype``, ``remat``, ``scan_layers``,
    ``attention_implementation``)."""

  @abc.abstractmethod
  def hf_name_to_path(self, name: str, config: Any) -> str | None:
    """A transformers tensor name -> Flax params path (no ``params/``), ``None`` for buffers."""

  @abc.abstractmethod
  def path_to_hf_name(self, path: str, config: Any, prefix: str = "") -> str:
    """The inverse; ``prefix`` (``"bert."``) goes on base-model modules."""

  @abc.abstractmethod
  def default_prefix(self, tree: Mapping, config: Any) -> str:
    """The prefix a params tree's names carry."""

  @abc.abstractmethod
  def is_head(self, path: str) -> bool:
    """Whether a checkpoint may lack this leaf (a head initialised afresh)."""

  @abc.abstractmethod
  def architecture(self, tree: Mapping, config: Any) -> str:
    """transformers' class name for the tree (``"BertForSequenceClassification"``)."""


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> None:
  """Makes ``family`` the one for its ``model_types``."""
  for model_type in family.model_types:
    _REGISTRY[model_type] = family


def family_of(config: Any) -> Family:
  """The :class:`Family` of ``config`` (by ``model_type``).

  Raises:
    ValueError: a ``model_type`` no family implements (the supported ones are listed).
  """
  model_type = getattr(config, "model_type", None)
  if model_type not in _REGISTRY:
    raise ValueError(
      f"unsupported model_type {model_type!r} (from {type(config).__name__}); "
      f"supported: {', '.join(_REGISTRY)}"
    )
  return _REGISTRY[model_type]
