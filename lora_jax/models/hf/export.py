"""``export_merged``: adapters folded into the weights, written as a Hugging Face checkpoint.

The folder holds ``config.json`` (``config.save_pretrained``) and ``model.safetensors`` with
transformers' own names and layouts (:func:`lora_jax.models.flax_to_hf`), so
``transformers.AutoModel*.from_pretrained(folder)`` loads it with no lora_jax or PEFT
installed; the tokenizer files too when one is given.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lora_jax._src import paths
from lora_jax._src.files import publish
from lora_jax._src.files import write_safetensors
from lora_jax._src.merge import merge
from lora_jax.models.hf.checkpoint import SAFETENSORS
from lora_jax.models.hf.convert import flax_to_hf
from lora_jax.models.hf.family import family_of


def export_merged(directory, params, *, config: Any, tokenizer: Any = None) -> Path:
  """Merges the adapters of ``params`` and writes a transformers checkpoint to ``directory``.

  Args:
    directory: the folder to write to (created if needed). Each file is written completely
      or not at all; other files in the folder are left alone.
    params: variables dict or bare params tree of a :mod:`lora_jax.models` model, with or
      without adapters.
    config: the model's transformers config (``BertConfig``, ``RobertaConfig``, ``LlamaConfig``,
      ...). A copy is saved, its ``architectures`` set from the tree
      (``BertForSequenceClassification`` when it has a ``classifier``, else ``BertModel``;
      ``LlamaForCausalLM`` for a decoder with a head or tied embeddings); the caller's object
      is not changed. Scanned layers are written per layer, as transformers names them.
    tokenizer: a transformers tokenizer to save beside the model, or ``None``.

  Returns:
    ``directory`` as a ``pathlib.Path``.

  Raises:
    ValueError: ``config.num_labels`` differs from the classifier's outputs, or an unsupported
      ``model_type``.
    FloatingPointError: a merged weight is not finite.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, transformers
    >>> from lora_jax import LoraRule, lora_init
    >>> from lora_jax.models import auto_model, export_merged
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=16)
    >>> variables = jax.jit(auto_model(cfg).init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    >>> params = lora_init(variables, LoraRule(["query"], rank=2), rng=jax.random.key(1))
    >>> folder = export_merged(tempfile.mkdtemp(), params, config=cfg)
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'model.safetensors']
    >>> type(transformers.AutoModel.from_pretrained(folder)).__name__
    'BertModel'
  """
  family = family_of(config)
  tree, _ = paths.split_params(merge(params))
  config = copy.deepcopy(config)
  config.architectures = [family.architecture(tree, config)]
  state = flax_to_hf(tree, config)

  def write(tmp: Path) -> None:
    config.save_pretrained(tmp)
    write_safetensors(state, tmp / SAFETENSORS, {"format": "pt"})
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)

  return publish(directory, write, last=("config.json",))
