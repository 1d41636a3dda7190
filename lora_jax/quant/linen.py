"""Running a Flax module whose weight is quantized (the low-rank path of ``lora_apply``)."""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import numpy as np

from lora_jax._src import paths
from lora_jax._src.spec import ADAPTER_LEAVES
from lora_jax._src.spec import LORA_SPEC
from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.kernel import materialize

_RUNNABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _own_variables(module: nn.Module) -> dict:
  """The module's own params, adapters left out (the interceptor adds those)."""
  params = module.variables.get("params", {})
  adapter = (*ADAPTER_LEAVES, LORA_SPEC)
  return {k: v for k, v in params.items() if not isinstance(v, Mapping) and k not in adapter}


def holds_quantized(module: nn.Module) -> bool:
  """Whether ``module`` (bound) holds a quantized weight of its own."""
  return any(isinstance(v, QuantizedArray) for v in _own_variables(module).values())


def run_dequantized(module: nn.Module, method: str, *args, **kwargs):
  """``module.method(*args, **kwargs)`` with its quantized weights dequantized.

  A copy of the module runs on the dequantized weight; under ``jax.checkpoint``, so that the
  backward pass forms the weight again from the codes instead of keeping it (a scanned model
  would otherwise keep every layer's dequantized weights for the backward pass).
  """
  if not isinstance(module, _RUNNABLE) or method != "__call__":
    path = paths.join(paths.PARAMS, *module.scope.path)
    raise ValueError(
      f"module {path!r} ({type(module).__name__}.{method}) holds a quantized kernel, which "
      "lora_apply runs in nn.Dense, nn.DenseGeneral and nn.Einsum calls only"
    )
  plain = module.clone(parent=None)
  leaves, treedef = jax.tree.flatten((_own_variables(module), args, kwargs))
  traced = [isinstance(x, jax.Array | np.ndarray) for x in leaves]

  def run(arrays):
    it = iter(arrays)
    own, args, kwargs = jax.tree.unflatten(
      treedef, [next(it) if t else x for x, t in zip(leaves, traced, strict=True)]
    )
    params = {k: materialize(v) for k, v in own.items()}
    return plain.apply({"params": params}, *args, **kwargs)

  return jax.checkpoint(run)([x for x, t in zip(leaves, traced, strict=True) if t])
