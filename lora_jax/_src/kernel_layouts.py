"""``kernel_layouts`` for both front ends: linen modules are traced, NNX models read."""

from __future__ import annotations

from lora_jax._src.layouts import Layouts
from lora_jax._src.layouts import trace_layouts
from lora_jax.nnx import tree as nnx_tree


def kernel_layouts(module, *args, **kwargs) -> Layouts:
  """Traces ``module.init(rng, *args, **kwargs)`` (shapes only) and records every weight's layout.

  Returns ``{module path: KernelLayout}`` for each supported module, with paths as
  :func:`lora_jax.lora_init` matches them (``"params/..."``). Modules whose weight cannot be
  factored (e.g. a ``DenseGeneral`` with ``batch_dims``) are left out (the result's
  ``refused`` says why), so rules that reach them fail in ``lora_init`` with that reason.
  Modules inside ``nn.scan`` get ``stacked`` set to the number of leading axes the scan adds to
  their weight. An NNX model needs no tracing: its layouts are read off its modules
  (:func:`lora_jax.nnx.layouts`, which :func:`lora_jax.nnx.lora_init` calls itself).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import kernel_layouts
    >>> heads = nn.DenseGeneral(features=(4, 8), name="query")
    >>> kernel_layouts(heads, jnp.zeros((1, 32)))
    {'params': KernelLayout(in_axes=(0,), out_axes=(1, 2), kind='dense', stacked=0)}
    >>> class Block(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, _):
    ...     return nn.Dense(32, name="proj")(x), None
    >>> layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
    ...                  length=4)(name="layers")
    >>> kernel_layouts(layers, jnp.zeros((1, 32)), None)  # kernel [4, 32, 32]
    {'params/proj': KernelLayout(in_axes=(0,), out_axes=(1,), kind='dense', stacked=1)}
  """
  if nnx_tree.is_model(module):  # NNX modules say their own axes: nothing to trace
    return nnx_tree.read_layouts(module)
  return trace_layouts(module, *args, **kwargs)
