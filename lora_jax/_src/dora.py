"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): the math on pytrees.

DoRA splits an adapted weight into a direction and a magnitude per output unit:

  ``W' = m * (W + delta) / ||W + delta||``,  ``delta = scale * A @ B``,

the norm taken over the weight's input axes, one value per output unit (the row of the weight
as transformers stores it, ``[out, in]``; a column of our ``[in, out]`` kernel). ``m``
(``lora_magnitude``, float32, trainable) starts at ``||W + delta||`` of the freshly initialised
adapter, so that ``W' == W + delta`` at step 0, as in PEFT.

As the paper's section 4.3 suggests (and PEFT does), the norm is a constant to the gradient
(``jax.lax.stop_gradient``): it follows ``A`` and ``B`` in value but passes no gradient to
them, so the low-rank path never forms a weight-sized gradient. On that path a module computes

  ``y = W x + bias + (m/n - 1) * W x + (m/n) * scale * B A x``,  ``n = ||W + delta||``,

reusing the module's own ``W x`` (PEFT's ``DoraLinearLayer``); forming ``W + delta`` once per
call (to take its norm) is the only weight-sized work.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lora_jax._src.spec import LoraSpec
from lora_jax._src.spec import delta


def magnitude_shape(spec: LoraSpec, weight_shape) -> tuple[int, ...]:
  """``lora_magnitude``'s shape: the stacked axes, then the weight's output axes (as ``B``'s)."""
  b_shape = spec.b_shape(weight_shape)
  return (*b_shape[: spec.stacked], *b_shape[spec.stacked + 1 :])


def _layer_spec(spec: LoraSpec, weight) -> LoraSpec:
  """``spec`` with ``stacked`` read off ``weight``: inside ``nn.scan`` a module sees one layer."""
  stacked = weight.ndim - len(spec.in_axes) - len(spec.out_axes)
  return spec if stacked == spec.stacked else dataclasses.replace(spec, stacked=stacked)


def weight_norm(spec: LoraSpec, w, a, b) -> jax.Array:
  """``||W + delta||`` per output unit, float32, shaped like ``lora_magnitude``; no gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax import LoraSpec
    >>> from lora_jax._src.dora import weight_norm
    >>> spec = LoraSpec(rank=1, alpha=1.0, rslora=False, dropout=0.0, weight="kernel",
    ...                 in_axes=(0,), out_axes=(1,), use_dora=True)
    >>> w = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # [in, out]: output unit 0 is (3, 4)
    >>> weight_norm(spec, w, jnp.zeros((2, 1)), jnp.zeros((1, 2)))
    Array([5., 1.], dtype=float32)
  """
  spec = _layer_spec(spec, w)
  v = w.astype(jnp.float32) + delta(spec, a, b)
  n = jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(spec.stacked + i for i in spec.in_axes)))
  # The remaining axes are the stacked ones, then the output axes in ascending order; put the
  # latter in out_axes order, as lora_magnitude (and lora_b) hold them.
  ascending = sorted(spec.out_axes)
  order = [ascending.index(o) for o in spec.out_axes]
  n = jnp.transpose(n, (*range(spec.stacked), *(spec.stacked + i for i in order)))
  return jax.lax.stop_gradient(n)


def init_magnitude(spec: LoraSpec, w, a, b):
  """DoRA's starting magnitude: ``||W + delta||`` of the fresh adapter (shapes pass through)."""
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(w)):  # shapes only
    return jax.ShapeDtypeStruct(magnitude_shape(spec, w.shape), jnp.float32)
  return weight_norm(spec, w, a, b)


def ratio(spec: LoraSpec, w, a, b, m) -> jax.Array:
  """``m / stop_gradient(||W + delta||)``, float32, per output unit (PEFT's mag_norm_scale)."""
  return m.astype(jnp.float32) / weight_norm(spec, w, a, b)


def _in_weight_layout(spec: LoraSpec, per_unit) -> jax.Array:
  """A per-output-unit array (``lora_magnitude``'s layout) shaped to broadcast with the weight."""
  n = spec.stacked
  ascending = sorted(spec.out_axes)
  per_unit = jnp.transpose(per_unit, (*range(n), *(n + spec.out_axes.index(o) for o in ascending)))
  return jnp.expand_dims(per_unit, tuple(n + i for i in spec.in_axes))


def merged_weight(spec: LoraSpec, w, a, b, m) -> jax.Array:
  """``m * (W + delta) / ||W + delta||`` in float32 (the caller casts to ``W``'s dtype)."""
  spec = _layer_spec(spec, w)
  factor = _in_weight_layout(spec, ratio(spec, w, a, b, m))
  return factor * (w.astype(jnp.float32) + delta(spec, a, b))


def unmerged_weight(spec: LoraSpec, merged, w, a, b, m) -> jax.Array:
  """Undoes :func:`merged_weight` in float32: ``merged / (m / ||W + delta||) - delta``.

  The norm is that of the base ``W`` the adapter was merged into (the merged weight's own
  norms are ``|m|`` and say nothing of it), as PEFT's ``unmerge`` reuses the norm it cached
  when merging.
  """
  spec = _layer_spec(spec, w)
  factor = _in_weight_layout(spec, ratio(spec, w, a, b, m))
  return merged.astype(jnp.float32) / factor - delta(spec, a, b)


def output(base, w_x, lora, r) -> jax.Array:
  """The low-rank path's DoRA output from the module's ``base = W x + bias``, ``w_x = W x``
  (on the dropped-out input when LoRA dropout is active), ``lora = scale * B A x`` and
  ``r = m / ||W + delta||``, in ``base``'s dtype.

  ``(r - 1)`` is formed in float32 before the cast, so a low-precision dtype keeps the small
  difference from 1 rather than rounding ``r`` first.
  """
  dtype = base.dtype
  return base + ((r - 1.0).astype(dtype) * w_x + r.astype(dtype) * lora).astype(dtype)
