"""Hugging Face names <-> Flax paths for BERT and RoBERTa (:mod:`lora_jax.models.encoder.bert`).

* ``bert.`` / ``roberta.`` prefixes (``*ForSequenceClassification`` checkpoints) are dropped;
  heads (``classifier``) never carry one.
* ``...weight`` of a Linear is a Flax ``kernel`` (transposed by the loader); of an Embedding it
  is ``embedding``; of a LayerNorm it is ``scale`` (old ``gamma`` / ``beta`` names accepted).
* Non-persistent buffers (``embeddings.position_ids``, ``embeddings.token_type_ids``) that old
  checkpoints still carry are skipped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_jax.models.encoder import bert
from lora_jax.models.hf.family import HF_LEAF
from lora_jax.models.hf.family import Family

MODEL_TYPES = bert.MODEL_TYPES
DEFAULT_TASK = "base"
LAYERS = None  # never scanned
BASE_PREFIX = {"bert": "bert", "roberta": "roberta"}
_BASE_MODULES = ("embeddings", "encoder", "pooler")
_HEAD_MODULES = ("pooler", "classifier")  # may be absent from a checkpoint: freshly initialised
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_OLD_NAMES = {"gamma": "weight", "beta": "bias"}
_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta"}


class Encoders(Family):
  """BERT and RoBERTa encoders."""

  name = "encoder"
  model_types = MODEL_TYPES
  default_task = DEFAULT_TASK
  layers = LAYERS
  base_prefix = BASE_PREFIX
  classifies = True

  def build(self, config: Any, task: str | None, **kw) -> bert.Bert:
    if kw.pop("scan_layers", False):
      raise ValueError(
        f"scan_layers=True is not supported for {config.model_type!r} encoders (decoders only)"
      )
    return bert.auto_model(config, task or DEFAULT_TASK, **kw)

  def hf_name_to_path(self, name: str, config: Any) -> str | None:
    """``"bert.encoder.layer.0.attention.self.query.weight"`` -> ``".../query/kernel"``."""
    prefix = BASE_PREFIX[config.model_type] + "."
    if name.startswith(prefix):
      name = name[len(prefix) :]
    if name in _BUFFERS:
      return None
    *modules, leaf = name.split(".")
    leaf = _OLD_NAMES.get(leaf, leaf)
    if modules and modules[-1] == "LayerNorm":
      leaf = {"weight": "scale"}.get(leaf, leaf)
    elif modules and modules[-1] in _EMBEDDINGS:
      leaf = {"weight": "embedding"}.get(leaf, leaf)
    else:
      leaf = {"weight": "kernel"}.get(leaf, leaf)
    return "/".join([*modules, leaf])

  def path_to_hf_name(self, path: str, config: Any, prefix: str = "") -> str:
    """Inverse of :func:`hf_name_to_path`; ``prefix`` (e.g. ``"bert."``) goes on base modules."""
    *modules, leaf = path.split("/")
    head = prefix if modules and modules[0] in _BASE_MODULES else ""
    return head + ".".join([*modules, HF_LEAF[leaf]])

  def default_prefix(self, tree: Mapping, config: Any) -> str:
    """``"bert."`` / ``"roberta."`` when the tree has a ``classifier``, else ``""``."""
    return BASE_PREFIX[config.model_type] + "." if "classifier" in tree else ""

  def is_head(self, path: str) -> bool:
    """Whether a checkpoint may lack this leaf (a head that starts from random weights)."""
    return path.split("/", 1)[0] in _HEAD_MODULES

  def architecture(self, tree: Mapping, config: Any) -> str:
    """transformers' class for a params tree: ``BertModel`` or ``...ForSequenceClassification``.

    Raises:
      ValueError: ``config.num_labels`` differs from the classifier's outputs.
    """
    head = tree.get("classifier")
    prefix = _CLASS_PREFIX[config.model_type]
    if head is None:
      return f"{prefix}Model"
    kernel = head["out_proj"]["kernel"] if config.model_type == "roberta" else head["kernel"]
    outputs = int(kernel.shape[-1])
    if config.num_labels != outputs:
      raise ValueError(
        f"config.num_labels={config.num_labels} but the classifier has {outputs} outputs; pass "
        f"a config with num_labels={outputs} (e.g. AutoConfig.from_pretrained(..., "
        f"num_labels={outputs}))"
      )
    return f"{prefix}ForSequenceClassification"


ENCODERS = Encoders()
