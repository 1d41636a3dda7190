"""PEFT's LoRA adapter folders: export lora_jax adapters for PyTorch, import PEFT's.

* :mod:`lora_jax.peft.config`: ``adapter_config.json`` (file names, ``LoraConfig``'s defaults,
  the options lora_jax cannot reproduce, ``rank_pattern`` rules);
* :mod:`lora_jax.peft.names`: the :class:`NameMapping` from Flax paths to a PyTorch model's
  names, which model families supply;
* :mod:`lora_jax.peft.export`: :func:`export_peft`;
* :mod:`lora_jax.peft.load`: :func:`import_peft`.

``lora_jax.export_peft`` and ``lora_jax.import_peft`` are the same functions.
"""

from lora_jax.peft.export import export_peft
from lora_jax.peft.load import import_peft
from lora_jax.peft.names import FlaxNames
from lora_jax.peft.names import NameMapping
from lora_jax.peft.names import register

__all__ = (
  "FlaxNames",
  "NameMapping",
  "export_peft",
  "import_peft",
  "register",
)
