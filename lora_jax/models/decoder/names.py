"""Hugging Face names <-> Flax paths for the Llama-family decoders (:mod:`.llama`).

Flax paths are transformers' module names with ``/`` for ``.``: ``model.layers.0.mlp.up_proj``
is ``model/layers/0/mlp/up_proj``. A Linear's ``weight`` is a Flax ``kernel`` (transposed by the
loader), ``embed_tokens.weight`` an ``embedding``, an RMSNorm's ``weight`` a ``scale``.
Checkpoints of the bare ``*Model`` (names without ``model.``) map to the same paths, and
``rotary_emb.inv_freq`` buffers that old checkpoints carry are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_jax.models.decoder import llama
from lora_jax.models.hf.family import HF_LEAF
from lora_jax.models.hf.family import Family

MODEL_TYPES = llama.MODEL_TYPES
DEFAULT_TASK = "causal-lm"
LAYERS = llama.LAYERS
BASE_PREFIX: dict[str, str] = {}  # decoder paths carry model/ themselves
_CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


class Decoders(Family):
  """Llama-family decoders (Llama, Mistral, Qwen2, Qwen3)."""

  name = "decoder"
  model_types = MODEL_TYPES
  default_task = DEFAULT_TASK
  layers = LAYERS
  base_prefix = BASE_PREFIX

  def build(self, config: Any, task: str | None, **kw) -> llama.Decoder:
    return llama.auto_model(config, task or DEFAULT_TASK, **kw)

  def hf_name_to_path(self, name: str, config: Any) -> str | None:
    """``"model.layers.0.mlp.up_proj.weight"`` -> ``"model/layers/0/mlp/up_proj/kernel"``."""
    del config
    if name.endswith("rotary_emb.inv_freq"):
      return None
    if not name.startswith(("model.", "lm_head.")):
      name = "model." + name  # a bare *Model checkpoint
    *modules, leaf = name.split(".")
    if leaf == "weight":
      if modules[-1] == "embed_tokens":
        leaf = "embedding"
      elif modules[-1].endswith("norm"):
        leaf = "scale"
      else:
        leaf = "kernel"
    return "/".join([*modules, leaf])

  def path_to_hf_name(self, path: str, config: Any, prefix: str = "") -> str:
    """Inverse of :func:`hf_name_to_path` (``prefix`` is unused: paths carry ``model/``)."""
    del config, prefix
    *modules, leaf = path.split("/")
    return ".".join([*modules, HF_LEAF[leaf]])

  def default_prefix(self, tree: Mapping, config: Any) -> str:
    del tree, config
    return ""

  def is_head(self, path: str) -> bool:
    del path
    return False  # every weight of a decoder comes from its checkpoint

  def architecture(self, tree: Mapping, config: Any) -> str:
    """``LlamaForCausalLM`` (a head or tied embeddings) or ``LlamaModel`` (and so on per family)."""
    prefix = _CLASS_PREFIX[config.model_type]
    causal = "lm_head" in tree or getattr(config, "tie_word_embeddings", False)
    return f"{prefix}ForCausalLM" if causal else f"{prefix}Model"


DECODERS = Decoders()
