"""QLoRA's frozen base: kernels quantized to NF4 or int8, dequantized inside the step.

* :mod:`lora_jax.quant.array`: the :class:`QuantizedArray` type (a pytree of stored arrays);
* :mod:`lora_jax.quant.nf4` and :mod:`lora_jax.quant.int8`: the codes of one layer's kernel;
* :mod:`lora_jax.quant.kernel`: one kernel quantized or dequantized, stacked layers included;
* :mod:`lora_jax.quant.tree`: :class:`Quantization` and :func:`quantize` over a params tree;
* :mod:`lora_jax.quant.linen`: running a Flax module on its dequantized weight.

The public names are also ``lora_jax.Quantization``, ``lora_jax.quantize`` and so on.
"""

from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.array import is_quantized
from lora_jax.quant.kernel import dequantize
from lora_jax.quant.tree import Quantization
from lora_jax.quant.tree import quantize

__all__ = (
  "Quantization",
  "QuantizedArray",
  "dequantize",
  "is_quantized",
  "quantize",
)
