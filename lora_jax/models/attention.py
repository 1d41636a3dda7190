"""Attention and the position bookkeeping shared by the encoders and decoders."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


def attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  mask: jax.Array | None,
  implementation: str | None = None,
) -> jax.Array:
  """``jax.nn.dot_product_attention`` on ``[batch, seq, heads, head_dim]`` arrays.

  ``implementation=None`` picks cuDNN's fused kernel on GPU for 16-bit inputs (falling back to
  XLA if cuDNN rejects the inputs while tracing) and XLA otherwise: up to jax 0.10 at least,
  ``dot_product_attention(implementation=None)`` always means XLA, and fused attention roughly
  doubles training throughput on GPU.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"unknown attention implementation {implementation!r}; valid: {ATTENTION_IMPLEMENTATIONS}"
    )
  call = functools.partial(jax.nn.dot_product_attention, query, key, value, mask=mask)
  if implementation is not None:
    return call(implementation=implementation)
  if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return call(implementation="cudnn")
    except Exception as e:  # unsupported shape, dtype or cuDNN version: XLA computes the same.
      logger.warning("cuDNN attention unavailable (%s); using XLA attention", e)
  return call(implementation="xla")


def check_implementation(implementation: str | None) -> None:
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"unknown attention_implementation {implementation!r}; valid: {ATTENTION_IMPLEMENTATIONS}"
    )


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Each token's offset from the start of its sequence in rows that pack several.

  ``segment_ids`` ``[rows, seq]`` numbers the sequences of a row ``1, 2, ...`` (``0``:
  padding, which gets ``0``).

  Example:
    >>> import numpy as np
    >>> np.asarray(segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]]))).tolist()
    [[0, 1, 2, 0, 1, 0]]
  """
  seq = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  offset = index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return jnp.where(segment_ids > 0, offset, 0)


def same_segment(segment_ids: jax.Array) -> jax.Array:
  """``[rows, 1, seq, seq]``: whether query and key tokens belong to one packed sequence."""
  seg = jnp.asarray(segment_ids)
  return (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] > 0)
