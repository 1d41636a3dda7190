"""LoRA for Flax NNX models: the same rules, adapters, merges and files as for linen.

``lora_init`` adds ``nnx.LoRAParam`` adapters to an NNX model in place; the adapted layers run
the low-rank path (no weight-sized gradient), so ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)`` trains exactly the adapters. The tree-level functions of
:mod:`lora_jax` (``param_report``, ``save_adapter``, ``load_adapter``, ``export_peft``,
``import_peft``, ``quantize``) take an NNX model wherever they take a parameter tree.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import lora_jax
  >>> model = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
  >>> model = lora_jax.nnx.lora_init(model, lora_jax.LoraRule(".*", rank=2), rngs=nnx.Rngs(1))
  >>> print(lora_jax.param_report(model).splitlines()[0])
  trainable params: 40 || all params: 108 || trainable%: 37.0370
"""

from lora_jax.nnx.transforms import layouts
from lora_jax.nnx.transforms import lora_init
from lora_jax.nnx.transforms import merge
from lora_jax.nnx.transforms import unload
from lora_jax.nnx.transforms import unmerge
from lora_jax.nnx.tree import is_model

__all__ = ("is_model", "layouts", "lora_init", "merge", "unload", "unmerge")
