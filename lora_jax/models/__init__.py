"""Flax models that load Hugging Face checkpoints: BERT/RoBERTa encoders, Llama-family decoders.

``from_pretrained(path_or_hub_id, task=...)`` returns ``(module, {"params": ...})`` with
parameters named after the Hugging Face modules, so PEFT's target names mean the same here:

  >>> import jax, jax.numpy as jnp, transformers
  >>> from lora_jax.models import auto_model
  >>> cfg = transformers.RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
  ...                                  num_attention_heads=2, intermediate_size=16)
  >>> model = auto_model(cfg, "sequence-classification")
  >>> shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  >>> shapes["params"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"].shape
  (8, 8)
  >>> sorted(shapes["params"]["classifier"])
  ['dense', 'out_proj']
  >>> cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16,
  ...                                num_hidden_layers=2, num_attention_heads=2)
  >>> shapes = jax.eval_shape(auto_model(cfg).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  >>> shapes["params"]["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"].shape
  (8, 8)

Layout: :mod:`.layers` (attention kernels, RoPE, activations, the fused cross-entropy), one
folder per family (:mod:`.encoder`, :mod:`.decoder` with its generation) and :mod:`.hf`
(checkpoint files, name conversion, the family registry, ``from_pretrained``, merged export).
"""

from lora_jax.models.decoder.generate import export_generate
from lora_jax.models.decoder.generate import generate
from lora_jax.models.decoder.llama import Decoder
from lora_jax.models.decoder.llama import DecoderConfig
from lora_jax.models.decoder.llama import DecoderLayer
from lora_jax.models.decoder.llama import KVCache
from lora_jax.models.encoder.bert import Bert
from lora_jax.models.encoder.bert import BertAttention
from lora_jax.models.encoder.bert import BertEmbeddings
from lora_jax.models.encoder.bert import BertEncoder
from lora_jax.models.encoder.bert import BertIntermediate
from lora_jax.models.encoder.bert import BertLayer
from lora_jax.models.encoder.bert import BertResidualOutput
from lora_jax.models.encoder.bert import BertSelfAttention
from lora_jax.models.encoder.bert import EncoderConfig
from lora_jax.models.encoder.heads import BertPooler
from lora_jax.models.encoder.heads import RobertaClassificationHead
from lora_jax.models.hf.checkpoint import read_state_dict
from lora_jax.models.hf.convert import flax_to_hf
from lora_jax.models.hf.convert import hf_to_flax
from lora_jax.models.hf.export import export_merged
from lora_jax.models.hf.loading import auto_model
from lora_jax.models.hf.loading import from_config
from lora_jax.models.hf.loading import from_pretrained
from lora_jax.models.layers.cross_entropy import fused_cross_entropy

__all__ = [
  "Bert",
  "BertAttention",
  "BertEmbeddings",
  "BertEncoder",
  "BertIntermediate",
  "BertLayer",
  "BertPooler",
  "BertResidualOutput",
  "BertSelfAttention",
  "Decoder",
  "DecoderConfig",
  "DecoderLayer",
  "EncoderConfig",
  "KVCache",
  "RobertaClassificationHead",
  "auto_model",
  "export_generate",
  "export_merged",
  "flax_to_hf",
  "from_config",
  "from_pretrained",
  "fused_cross_entropy",
  "generate",
  "hf_to_flax",
  "read_state_dict",
]
