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
"""

from lora_jax.models.bert import Bert
from lora_jax.models.bert import BertAttention
from lora_jax.models.bert import BertEmbeddings
from lora_jax.models.bert import BertEncoder
from lora_jax.models.bert import BertIntermediate
from lora_jax.models.bert import BertLayer
from lora_jax.models.bert import BertResidualOutput
from lora_jax.models.bert import BertSelfAttention
from lora_jax.models.bert import EncoderConfig
from lora_jax.models.cross_entropy import fused_cross_entropy
from lora_jax.models.export import export_merged
from lora_jax.models.generate import generate
from lora_jax.models.heads import BertPooler
from lora_jax.models.heads import RobertaClassificationHead
from lora_jax.models.llama import Decoder
from lora_jax.models.llama import DecoderConfig
from lora_jax.models.llama import DecoderLayer
from lora_jax.models.llama import KVCache
from lora_jax.models.loading import auto_model
from lora_jax.models.loading import flax_to_hf
from lora_jax.models.loading import from_config
from lora_jax.models.loading import from_pretrained
from lora_jax.models.loading import hf_to_flax
from lora_jax.models.loading import read_state_dict

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
  "export_merged",
  "flax_to_hf",
  "from_config",
  "from_pretrained",
  "fused_cross_entropy",
  "generate",
  "hf_to_flax",
  "read_state_dict",
]
