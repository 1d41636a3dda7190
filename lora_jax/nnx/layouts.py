"""How an NNX module's weight splits into input and output axes: read off the module itself.

A Flax NNX module carries its shape attributes (``in_features``, ``axis``, ``einsum_str``,
``kernel_size``, ...) as Python attributes, so unlike linen no tracing is needed: every
supported module says which axes of its weight it contracts with its input. A weight with more
leading axes than the module's attributes account for belongs to layers stacked by
``nnx.vmap`` (run with ``nnx.scan``); those axes are ``stacked``.
"""

from __future__ import annotations

from flax import nnx

from lora_jax._src.layouts import KernelLayout
from lora_jax._src.layouts import UnsupportedLayout
from lora_jax._src.layouts import einsum_layout

SUPPORTED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
SUPPORTED_NAMES = "nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed"


def weight_name(module: nnx.Module) -> str:
  return "embedding" if isinstance(module, nnx.Embed) else "kernel"


def _one_layer(module: nnx.Module) -> KernelLayout:
  """The layout of one layer's weight (no stacked axes)."""
  if isinstance(module, nnx.Embed | nnx.Linear):
    return KernelLayout((0,), (1,), "embed" if isinstance(module, nnx.Embed) else "dense")
  if isinstance(module, nnx.LinearGeneral):
    if module.batch_axis:
      raise UnsupportedLayout(
        f"nnx.LinearGeneral with batch_axis={dict(module.batch_axis)} is not supported by LoRA"
      )
    n_in, n_out = len(module.in_features), len(module.out_features)
    return KernelLayout(tuple(range(n_in)), tuple(range(n_in, n_in + n_out)), "dense")
  if isinstance(module, nnx.Einsum):
    if module.einsum_str is None:
      raise UnsupportedLayout(
        "nnx.Einsum without an einsum_str attribute (given per call) cannot be adapted: the "
        "kernel's axes are not known until it is called"
      )
    return einsum_layout(module.einsum_str)
  if isinstance(module, nnx.Conv):
    if module.feature_group_count != 1:
      raise UnsupportedLayout(
        f"nnx.Conv with feature_group_count={module.feature_group_count} is not supported by LoRA"
      )
    if module.mask is not None:
      raise UnsupportedLayout("a masked nnx.Conv is not supported by LoRA")
    n = len(module.kernel_size) + 1
    return KernelLayout(tuple(range(n)), (n,), "conv")
  raise UnsupportedLayout(
    f"{type(module).__name__} is not supported by lora_jax.nnx (supported: {SUPPORTED_NAMES})"
  )


def module_layout(module: nnx.Module, ndim: int) -> KernelLayout:
  """The layout of ``module``'s weight of ``ndim`` axes; axes beyond one layer's are stacked.

  Raises:
    UnsupportedLayout: the module's weight cannot carry an adapter (the message says why).
  """
  layout = _one_layer(module)
  stacked = ndim - len(layout.in_axes) - len(layout.out_axes)
  if stacked < 0:
    raise UnsupportedLayout(
      f"its weight has {ndim} axes, fewer than the {ndim - stacked} its attributes describe"
    )
  return layout._replace(stacked=stacked)
