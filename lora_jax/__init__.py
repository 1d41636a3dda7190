"""lora_jax: LoRA as a pure transform on JAX/Flax parameter pytrees.

Example:
  >>> import flax.linen as nn, jax, jax.numpy as jnp
  >>> import lora_jax
  >>> model = nn.Dense(4)
  >>> x = jnp.ones((2, 8))
  >>> params = lora_jax.lora_init(model.init(jax.random.key(0), x),
  ...                             lora_jax.LoraRule(".*", rank=2), rng=jax.random.key(1))
  >>> y = lora_jax.lora_apply(model.apply)(params, x)
  >>> sorted(lora_jax.merge(params)["params"])  # plain weights again, for export
  ['bias', 'kernel']
"""

from lora_jax import nnx as nnx
from lora_jax._src.adapter_io import adapter_info
from lora_jax._src.adapter_io import load_adapter
from lora_jax._src.adapter_io import save_adapter
from lora_jax._src.apply import lora_apply
from lora_jax._src.bank import adapter_bank
from lora_jax._src.bank import bank_adapter
from lora_jax._src.bank import bank_names
from lora_jax._src.bank import is_bank
from lora_jax._src.bank import replace_adapter
from lora_jax._src.init import lora_init
from lora_jax._src.kernel_layouts import kernel_layouts
from lora_jax._src.layouts import KernelLayout
from lora_jax._src.merge import merge
from lora_jax._src.merge import unload
from lora_jax._src.merge import unmerge
from lora_jax._src.optimizer import lora_optimizer
from lora_jax._src.partition import combine
from lora_jax._src.partition import partition
from lora_jax._src.partition import trainable_mask
from lora_jax._src.report import param_report
from lora_jax._src.rules import LoraRule
from lora_jax._src.spec import LoraSpec
from lora_jax._src.stacking import stack_layers
from lora_jax._src.stacking import unstack_layers
from lora_jax._src.version import __version__ as __version__
from lora_jax._src.weighted import weighted_adapter
from lora_jax.peft import export_peft
from lora_jax.peft import import_peft
from lora_jax.quant import Quantization
from lora_jax.quant import QuantizedArray
from lora_jax.quant import dequantize
from lora_jax.quant import quantize

__all__ = (
  "KernelLayout",
  "LoraRule",
  "LoraSpec",
  "Quantization",
  "QuantizedArray",
  "adapter_bank",
  "adapter_info",
  "bank_adapter",
  "bank_names",
  "combine",
  "dequantize",
  "export_peft",
  "import_peft",
  "is_bank",
  "kernel_layouts",
  "load_adapter",
  "lora_apply",
  "lora_init",
  "lora_optimizer",
  "merge",
  "param_report",
  "partition",
  "quantize",
  "replace_adapter",
  "save_adapter",
  "stack_layers",
  "trainable_mask",
  "unload",
  "unmerge",
  "unstack_layers",
  "weighted_adapter",
)
