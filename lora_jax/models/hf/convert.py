"""Hugging Face tensor names <-> Flax params paths, for every registered model family.

Each :class:`~lora_jax.models.hf.family.Family` maps transformers' tensor names to Flax
``"a/b/c"`` paths; this module adds what they share: a Linear's ``weight`` is stored transposed
(``kernel [in, out]``), and scanned layers are split into (and stacked from) transformers'
per-layer tensors. It registers the built-in families (BERT/RoBERTa encoders, Llama-family
decoders), and each family's names for PEFT's adapter files (:class:`HFNames`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from lora_jax import peft
from lora_jax._src import stacking
from lora_jax.models.decoder.names import DECODERS
from lora_jax.models.encoder.names import ENCODERS
from lora_jax.models.hf.family import HF_LEAF
from lora_jax.models.hf.family import family_of
from lora_jax.models.hf.family import register


def hf_name_to_path(name: str, config: Any) -> str | None:
  """A transformers tensor name as the Flax ``"a/b/c"`` params path (no ``params/``).

  ``None`` for buffers that are not parameters. Names of modules the model lacks still map.

  Example:
    >>> import transformers
    >>> hf_name_to_path("model.layers.3.self_attn.q_proj.weight", transformers.LlamaConfig())
    'model/layers/3/self_attn/q_proj/kernel'
  """
  return family_of(config).hf_name_to_path(name, config)


def path_to_hf_name(path: str, config: Any, prefix: str = "") -> str:
  """Inverse of :func:`hf_name_to_path`; ``prefix`` (e.g. ``"bert."``) goes on base modules.

  Raises:
    ValueError: for a leaf that is not a plain weight (e.g. ``lora_a``: merge adapters first).
  """
  fam = family_of(config)
  leaf = path.rsplit("/", 1)[-1]
  if leaf not in HF_LEAF:
    raise ValueError(
      f"parameter {path!r} has no Hugging Face name: leaf {leaf!r} is not one of "
      f"{sorted(HF_LEAF)} (merge LoRA adapters into the weights before exporting)"
    )
  return fam.path_to_hf_name(path, config, prefix)


def is_kernel(path: str, ndim: int) -> bool:
  return path.endswith("/kernel") and ndim == 2


def to_flax_layout(path: str, array):
  return array.T if is_kernel(path, np.ndim(array)) else array


def flax_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(reversed(shape)) if is_kernel(path, len(shape)) else tuple(shape)


def stacked_layers(tree: Mapping, config: Any) -> str | None:
  """The container of ``tree``'s scanned (stacked) layers, or ``None`` if they are per layer."""
  container = family_of(config).layers
  if container is None or not stacking.is_stacked(tree, container):
    return None
  return container


def per_layer(tree: Mapping, config: Any) -> Mapping:
  """``tree`` (bare params) with scanned layers split per layer, as transformers names them."""
  container = stacked_layers(tree, config)
  return tree if container is None else stacking.unstack_layers(tree, container)


def hf_to_flax(state_dict: Mapping[str, Any], config: Any) -> dict:
  """A transformers state dict (name -> array) as a nested Flax params dict of numpy arrays.

  Every tensor is converted, whether the model uses it or not; layers come out unscanned
  (``model/layers/0/...``: :func:`lora_jax.stack_layers` stacks them). See
  :func:`from_pretrained` for checking against a model.

  Example:
    >>> import numpy as np, transformers
    >>> sd = {"bert.pooler.dense.weight": np.zeros((4, 3)), "classifier.bias": np.zeros(2)}
    >>> p = hf_to_flax(sd, transformers.BertConfig())
    >>> p["pooler"]["dense"]["kernel"].shape, sorted(p["classifier"])
    ((3, 4), ['bias'])
  """
  flat = {}
  for name, array in state_dict.items():
    path = hf_name_to_path(name, config)
    if path is not None:
      flat[path] = to_flax_layout(path, np.asarray(array))
  return traverse_util.unflatten_dict(flat, sep="/")


def default_prefix(params: Mapping, config: Any) -> str:
  """The base-model prefix :func:`flax_to_hf` uses by default for ``params``.

  ``"bert."`` / ``"roberta."`` when an encoder's tree has a ``classifier`` (a
  ``*ForSequenceClassification`` model), else ``""`` (decoder paths carry ``model/`` already).

  Example:
    >>> import transformers
    >>> default_prefix({"classifier": {}, "encoder": {}}, transformers.BertConfig())
    'bert.'
  """
  if "params" in params and isinstance(params["params"], Mapping):
    params = params["params"]
  return family_of(config).default_prefix(params, config)


def flax_to_hf(params: Mapping, config: Any, *, prefix: str | None = None) -> dict:
  """Flax params (or ``{"params": ...}``) as a transformers state dict of numpy arrays.

  Scanned layers are split into transformers' per-layer tensors.

  Args:
    params: the model's params tree (LoRA adapters merged).
    config: the transformers config of the model.
    prefix: put before base-model names, e.g. ``"roberta."``; by default
      :func:`default_prefix`.

  Example:
    >>> import numpy as np, transformers
    >>> cfg = transformers.RobertaConfig()
    >>> p = {"classifier": {"out_proj": {"kernel": np.zeros((3, 2))}},
    ...      "encoder": {"layer": {"0": {"output": {"LayerNorm": {"scale": np.ones(3)}}}}}}
    >>> {k: v.shape for k, v in flax_to_hf(p, cfg).items()}
    {'classifier.out_proj.weight': (2, 3), 'roberta.encoder.layer.0.output.LayerNorm.weight': (3,)}
  """
  if "params" in params and isinstance(params["params"], Mapping):
    params = params["params"]
  if prefix is None:
    prefix = default_prefix(params, config)
  out = {}
  flat = traverse_util.flatten_dict(per_layer(params, config), sep="/")
  for path, leaf in flat.items():
    out[path_to_hf_name(path, config, prefix)] = to_flax_layout(path, np.asarray(leaf))
  return out


def hf_module_name(module_path: str, config: Any, prefix: str = "") -> str:
  """A Flax module path (no ``params/``) as the transformers module name, e.g. for PEFT.

  Example:
    >>> import transformers
    >>> hf_module_name("encoder/layer/0/attention/self/query", transformers.BertConfig(), "bert.")
    'bert.encoder.layer.0.attention.self.query'
  """
  # Only leaf names differ between the two namings, so any weight leaf stands in for the module.
  return path_to_hf_name(f"{module_path}/kernel", config, prefix).removesuffix(".weight")


def hf_module_to_path(name: str, config: Any) -> str:
  """Inverse of :func:`hf_module_name`: ``"bert.encoder.layer.0.output.dense"`` -> Flax path.

  Example:
    >>> import transformers
    >>> hf_module_to_path("bert.embeddings.word_embeddings", transformers.BertConfig())
    'embeddings/word_embeddings'
  """
  return hf_name_to_path(f"{name}.weight", config).rsplit("/", 1)[0]


class HFNames:
  """A transformers model's names for PEFT's adapter files (a :class:`lora_jax.peft.NameMapping`).

  Example:
    >>> import transformers
    >>> names = HFNames(transformers.BertConfig(), {"classifier": {}})
    >>> names.module_name("encoder/layer/0/attention/self/query")
    'bert.encoder.layer.0.attention.self.query'
  """

  def __init__(self, config: Any, tree: Mapping):
    self.config = config
    self.prefix = default_prefix(tree, config)
    self.layers = family_of(config).layers

  def module_name(self, path: str) -> str:
    return hf_module_name(path, self.config, self.prefix)

  def module_path(self, name: str) -> str:
    return hf_module_to_path(name, self.config)

  def to_torch(self, tree: Mapping) -> dict[str, np.ndarray]:
    return flax_to_hf(tree, self.config, prefix=self.prefix)

  def from_torch(self, tensors: Mapping[str, np.ndarray]) -> dict:
    return hf_to_flax(tensors, self.config)


for _family in (ENCODERS, DECODERS):
  register(_family)
  peft.register(_family.model_types, HFNames)
