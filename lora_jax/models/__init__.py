"""Flax BERT/RoBERTa encoders that load Hugging Face checkpoints.

``from_pretrained("FacebookAI/roberta-base", "sequence-classification", num_labels=2)`` returns
``(module, {"params": ...})`` with parameters named after the Hugging Face modules:

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
from lora_jax.models.bert import auto_model
from lora_jax.models.export import export_merged
from lora_jax.models.heads import BertPooler
from lora_jax.models.heads import RobertaClassificationHead
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
  "EncoderConfig",
  "RobertaClassificationHead",
  "auto_model",
  "export_merged",
  "flax_to_hf",
  "from_config",
  "from_pretrained",
  "hf_to_flax",
  "read_state_dict",
]
