"""Attention within packed sequences by Pallas's fused kernels, from segment ids.

XLA's attention takes a dense ``[batch, 1, seq, keys]`` boolean mask and forms float32
``[batch, heads, seq, keys]`` scores. Pallas's flash-attention kernels take the rows' segment
ids and a causal flag instead and never form the scores whole, forward or backward: packed rows
keep their sequences apart without a dense mask, causal within each sequence for decoders
(``causal=True``) or bidirectional within it for encoders (``causal=False``). Two kernels, one
per accelerator:

* :func:`segment_attention`: ``jax.experimental.pallas.ops.gpu.attention.mha``
  (Triton, GPUs); elsewhere only interpreted by JAX (``interpret=True``: the same kernel code,
  slowly);
* :func:`tpu_segment_attention`: ``jax.experimental.pallas.ops.tpu.flash_attention``
  (Mosaic, TPUs); on other backends under ``jax.experimental.pallas.tpu
  .force_tpu_interpret_mode()`` (what the CPU tests run).

``attention(..., implementation="pallas")`` picks the one of the platform the program is
lowered for (:func:`jax.lax.platform_dependent`), and XLA's attention on other platforms.

Example:
  >>> import jax, jax.numpy as jnp
  >>> q = jax.random.normal(jax.random.key(0), (1, 40, 2, 16))
  >>> seg = jnp.array([[1] * 25 + [2] * 15])  # two sequences packed in one row
  >>> out = segment_attention(q, q, q, seg, interpret=True)
  >>> alone = segment_attention(q[:, 25:], q[:, 25:], q[:, 25:], seg[:, 25:], interpret=True)
  >>> bool(jnp.allclose(out[:, 25:], alone, atol=1e-5))  # the second sequence sees only itself
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLOCK = 128  # query and key block of the forward kernel (Pallas's default)
BACKWARD_BLOCK = 32  # blocks of the backward kernels (Pallas's defaults)


def padded_length(seq: int) -> int:
  """The length the kernel runs at: a multiple of each block it uses (``min(block, length)``),
  and Triton's blocks are powers of two. Up to :data:`BLOCK` tokens the next power of two (at
  least :data:`BACKWARD_BLOCK`), beyond it the next multiple of :data:`BLOCK`."""
  if seq > BLOCK:
    return -(-seq // BLOCK) * BLOCK
  return max(BACKWARD_BLOCK, 1 << (seq - 1).bit_length())


def _grouped_and_padded(query, key, value, segment_ids, length: int):
  """Key and value heads repeated for their query heads (grouped-query attention), and every
  array padded to ``length`` with segment id ``-1`` after the real tokens (a segment of its own,
  which no real token sees; its outputs are dropped)."""
  batch, seq, heads, _ = query.shape
  kv_heads = key.shape[2]
  if key.shape[1] != seq or value.shape[:3] != key.shape[:3] or heads % kv_heads:
    raise ValueError(
      f"segment_attention: query {query.shape}, key {key.shape} and value {value.shape} "
      "need one length and heads a multiple of kv_heads"
    )
  if kv_heads != heads:
    key = jnp.repeat(key, heads // kv_heads, axis=2)
    value = jnp.repeat(value, heads // kv_heads, axis=2)
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  pad = length - seq
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    query, key, value = (jnp.pad(x, widths) for x in (query, key, value))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
  return query, key, value, segment_ids


def segment_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  segment_ids: jax.Array,
  *,
  causal: bool = True,
  interpret: bool = False,
) -> jax.Array:
  """``softmax(q k^T / sqrt(head_dim)) v`` where each query sees the keys with its segment id:
  those at or before its own position (``causal``, decoders) or all of them (encoders).

  Args:
    query: ``[batch, seq, heads, head_dim]``.
    key, value: ``[batch, seq, kv_heads, head_dim]`` (grouped-query attention: ``heads`` a
      multiple of ``kv_heads``; each key/value head is repeated for its group).
    segment_ids: ``[batch, seq]`` integers: the sequence each token belongs to (padding
      included: a padding token sees only padding, so it gets no real token's attention).
    causal: each query sees only the keys at or before it (decoders); ``False``: every key of
      its segment (encoders).
    interpret: run the kernel interpreted by JAX (any backend) instead of compiled by Triton
      (GPU only).

  The length is padded up to :func:`padded_length` with segment id ``-1``, after every real
  token (no real token sees it); the padding's outputs are dropped. Compiled on a GPU, float32
  inputs are multiplied in TF32 (Pallas's default precision for Triton), as cuDNN does.
  """
  from jax.experimental.pallas.ops.gpu import attention as pallas_mha  # needs jax[...] only

  seq, dim = query.shape[1], query.shape[3]
  query, key, value, segment_ids = _grouped_and_padded(
    query, key, value, segment_ids, padded_length(seq)
  )
  out = pallas_mha.mha(
    query,
    key,
    value,
    segment_ids,
    sm_scale=dim**-0.5,
    causal=causal,
    block_sizes=pallas_mha.BlockSizes(
      block_q=BLOCK,
      block_k=BLOCK,
      block_q_dkv=BACKWARD_BLOCK,
      block_kv_dkv=BACKWARD_BLOCK,
      block_q_dq=BACKWARD_BLOCK,
      block_kv_dq=BACKWARD_BLOCK,
    ),
    interpret=interpret,
  )
  return out[:, :seq]


def tpu_padded_length(seq: int) -> int:
  """The length the TPU kernel runs at: a multiple of its :data:`BLOCK`-token blocks."""
  return -(-seq // BLOCK) * BLOCK


def tpu_segment_attention(query, key, value, segment_ids, *, causal: bool = True) -> jax.Array:
  """:func:`segment_attention` by Pallas's TPU flash-attention kernel (Mosaic).

  Same arguments and result (``[batch, seq, heads, head_dim]``, grouped-query heads
  repeated); the length is padded to :func:`tpu_padded_length`. Off a TPU it runs only under
  ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (forward and backward alike).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.experimental.pallas import tpu as pltpu
    >>> q = jax.random.normal(jax.random.key(0), (1, 40, 2, 16))
    >>> seg = jnp.array([[1] * 25 + [2] * 15])
    >>> with pltpu.force_tpu_interpret_mode():
    ...   out = tpu_segment_attention(q, q, q, seg)
    >>> bool(jnp.allclose(out, segment_attention(q, q, q, seg, interpret=True), atol=1e-5))
    True
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

  seq, dim = query.shape[1], query.shape[3]
  query, key, value, segment_ids = _grouped_and_padded(
    query, key, value, segment_ids, tpu_padded_length(seq)
  )
  heads_first = (0, 2, 1, 3)  # the kernel's layout: [batch, heads, seq, head_dim]
  out = tpu_flash.flash_attention(
    *(jnp.transpose(x, heads_first) for x in (query, key, value)),
    segment_ids=tpu_flash.SegmentIds(q=segment_ids, kv=segment_ids),
    causal=causal,
    sm_scale=dim**-0.5,
    block_sizes=tpu_flash.BlockSizes(
      block_q=BLOCK,
      block_k_major=BLOCK,
      block_k=BLOCK,
      block_b=1,
      block_q_major_dkv=BLOCK,
      block_k_major_dkv=BLOCK,
      block_k_dkv=BLOCK,
      block_q_dkv=BLOCK,
      block_k_major_dq=BLOCK,
      block_k_dq=BLOCK,
      block_q_dq=BLOCK,
    ),
  )
  return jnp.transpose(out, heads_first)[:, :seq]
