"""Attention and the position bookkeeping shared by the encoders and decoders."""

from __future__ import annotations

import functools
import logging

import flax.struct
import jax
import jax.numpy as jnp

from lora_jax.models.layers.pallas_attention import segment_attention
from lora_jax.models.layers.pallas_attention import tpu_segment_attention

logger = logging.getLogger(__name__)

ATTENTION_IMPLEMENTATIONS = (None, "xla", "xla_chunked", "cudnn", "pallas", "pallas_interpret")
# kernels that take segment ids and causality instead of a dense mask
SEGMENT_IMPLEMENTATIONS = ("pallas", "pallas_interpret")
# the rest take the dense mask (what sliding windows need)
DENSE_MASK_IMPLEMENTATIONS = tuple(
  i for i in ATTENTION_IMPLEMENTATIONS if i not in SEGMENT_IMPLEMENTATIONS
)
QUERY_CHUNK = 512  # queries per block of "xla_chunked"
# The custom calls of the fused kernels a lowered program may hold: Pallas's (Triton on GPUs,
# Mosaic on TPUs) and cuDNN's (forward and backward, with and without a mask). jax.export takes
# them only when told to (disabled_checks): it refuses custom calls without a stable ABI.
KERNEL_CALLS = (
  "__gpu$xla.gpu.triton", "tpu_custom_call", "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward",
  "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward",
)  # fmt: skip


def kernel_export_checks() -> list:
  """``jax.export``'s ``disabled_checks`` that let a lowered program hold :data:`KERNEL_CALLS`."""
  return [jax.export.DisabledSafetyCheck.custom_call(c) for c in KERNEL_CALLS]


@flax.struct.dataclass
class SegmentMask:
  """A mask twice: ``dense`` ``[batch, 1, seq, keys]`` booleans (or ``None``: every key), and,
  for kernels that take segment ids (:data:`SEGMENT_IMPLEMENTATIONS`), the same mask for every
  real query as ``segment_ids`` ``[batch, seq]``: each query sees the keys with its id, those at
  or before it where ``causal`` (decoders), all of them otherwise (encoders). ``segment_ids``
  is ``None`` where the dense mask is not of that form (sliding windows, a cache)."""

  dense: jax.Array | None
  segment_ids: jax.Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=True)


def attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  mask: jax.Array | SegmentMask | None,
  implementation: str | None = None,
) -> jax.Array:
  """``jax.nn.dot_product_attention`` on ``[batch, seq, heads, head_dim]`` arrays.

  ``implementation=None`` picks, when the program is lowered for its platform
  (``jax.lax.platform_dependent``), cuDNN's fused kernel on NVIDIA GPUs for 16-bit inputs
  (XLA's where cuDNN rejects the inputs while tracing, or where no cuDNN is installed, as when a
  CPU machine exports a GPU program) and XLA's otherwise: up to jax 0.10 at least,
  ``dot_product_attention(implementation=None)`` always means XLA, and fused attention roughly
  doubles training throughput on GPU.

  ``"xla_chunked"``: XLA's attention :data:`QUERY_CHUNK` queries at a time, each block's
  scores recomputed in the backward pass (:func:`chunked_attention`).

  ``"pallas"``: Pallas's fused kernel from the mask's segment ids (causal or not, as the
  :class:`SegmentMask` says), no dense mask, for the platform the program is lowered for:
  Triton on GPUs, Mosaic on TPUs (:mod:`lora_jax.models.layers.pallas_attention`), XLA's
  attention with the dense mask on other platforms. ``"pallas_interpret"`` runs the Triton
  kernel interpreted by JAX on any backend (slow: for tests). Both need a :class:`SegmentMask`
  with segment ids.
  """
  check_implementation(implementation)
  segment_ids, causal = None, True
  if isinstance(mask, SegmentMask):
    mask, segment_ids, causal = mask.dense, mask.segment_ids, mask.causal
  if implementation in SEGMENT_IMPLEMENTATIONS:
    return _segment_attention(query, key, value, segment_ids, mask, implementation, causal)
  if implementation == "xla_chunked":
    return chunked_attention(query, key, value, mask)
  call = functools.partial(jax.nn.dot_product_attention, query, key, value, mask=mask)
  if implementation is not None:
    return call(implementation=implementation)
  if query.dtype not in (jnp.bfloat16, jnp.float16):
    return call(implementation="xla")
  return jax.lax.platform_dependent(query, key, value, mask, cuda=_cudnn_or_xla, default=_xla)


def _xla(query, key, value, mask):
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")


def _cudnn_or_xla(query, key, value, mask):
  """cuDNN's fused attention, or XLA's where cuDNN refuses these inputs (XLA computes the
  same). jax reads the installed cuDNN's version while tracing: without one (a CPU machine
  exporting a GPU program) this is XLA's too."""
  try:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="cudnn")
  except Exception as e:  # unsupported shape, dtype or cuDNN version
    missing = "cuDNN is not detected" in str(e)  # no cuDNN here: not a GPU machine
    logger.log(
      logging.DEBUG if missing else logging.WARNING,
      "cuDNN attention unavailable (%s); using XLA attention", e,
    )  # fmt: skip
    return _xla(query, key, value, mask)


def _segment_attention(
  query, key, value, segment_ids, dense, implementation: str, causal: bool
) -> jax.Array:
  if segment_ids is None:
    raise ValueError(
      f"attention implementation {implementation!r} needs the rows' segment ids (a call "
      "without a cache or sliding windows); this call has a dense mask only"
    )
  if implementation == "pallas_interpret":
    return segment_attention(query, key, value, segment_ids, causal=causal, interpret=True)
  # The fused kernel of the platform the program is lowered for (chosen at lowering, so a CPU
  # machine exports GPU and TPU programs), XLA's attention with the dense mask elsewhere.
  kernels = {
    name: functools.partial(kernel, causal=causal) for name, kernel in FUSED_SEGMENT_KERNELS.items()
  }
  for name in ("cuda", "tpu"):
    kernels[name] = _per_device(kernels[name])
  return jax.lax.platform_dependent(query, key, value, segment_ids, dense, **kernels)


def _per_device(kernel):
  """``kernel`` on each device's rows when the program is partitioned over the context mesh
  (``jax.set_mesh``; ``train.engine.parallel``'s ``"mesh"`` mode sets it): the rows are split
  over the mesh's axes that are not already manual (inside ``shard_map`` or ``pmap``, nothing
  to do). XLA cannot partition a Pallas kernel itself: Mosaic's refuse to lower, and Triton's
  would see every row on every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel
  types = zip(mesh.axis_names, mesh.axis_types, strict=True)
  axes = tuple(name for name, kind in types if kind != jax.sharding.AxisType.Manual)
  if not axes:
    return kernel
  rows = jax.sharding.PartitionSpec(axes)
  return jax.shard_map(kernel, in_specs=rows, out_specs=rows, axis_names=set(axes), check_vma=False)


def _xla_with_dense_mask(query, key, value, segment_ids, dense, causal):
  del segment_ids, causal  # the dense mask says both
  return _xla(query, key, value, dense)


def _without_dense(kernel):
  def call(query, key, value, segment_ids, dense, causal):
    del dense
    return kernel(query, key, value, segment_ids, causal=causal)

  return call


# attention_implementation="pallas": the kernel for each platform (jax.lax.platform_dependent),
# each called as kernel(query, key, value, segment_ids, dense, causal)
FUSED_SEGMENT_KERNELS = {
  "cuda": _without_dense(segment_attention),
  "tpu": _without_dense(tpu_segment_attention),
  "default": _xla_with_dense_mask,
}


def chunked_attention(query, key, value, mask, chunk: int = QUERY_CHUNK) -> jax.Array:
  """XLA's attention over blocks of ``chunk`` queries, each under ``jax.checkpoint``.

  XLA's attention forms float32 ``[batch, heads, seq, keys]`` scores, probabilities and, in the
  backward pass, their gradient: 1.5 GiB a layer for 32 heads at 2048 tokens. Here one block's
  ``[batch, heads, chunk, keys]`` exist at a time, and the backward pass forms each block's
  again from the queries (the scores are computed once more: a few percent of a step's FLOPs).
  Same arguments as :func:`attention`; ``mask`` ``[batch or 1, heads or 1, seq, keys]`` or None.

  Example:
    >>> q = jax.random.normal(jax.random.key(0), (1, 6, 2, 4))
    >>> causal = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    >>> full = jax.nn.dot_product_attention(q, q, q, mask=causal)
    >>> bool(jnp.allclose(chunked_attention(q, q, q, causal, chunk=4), full, atol=1e-6))
    True
  """
  batch, seq = query.shape[:2]
  if seq <= chunk:
    return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation="xla")
  blocks, pad = -(-seq // chunk), -seq % chunk
  q = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(batch, blocks, chunk, *query.shape[2:]), 1, 0)
  if mask is not None:  # filler queries see every key (their outputs are dropped)
    mask = jnp.broadcast_to(mask, (batch, mask.shape[1], seq, key.shape[1]))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
    mask = jnp.moveaxis(mask.reshape(batch, mask.shape[1], blocks, chunk, -1), 2, 0)

  @jax.checkpoint
  def block(args):
    qb, mb = args
    return jax.nn.dot_product_attention(qb, key, value, mask=mb, implementation="xla")

  out = jax.lax.map(block, (q, mask))
  return jnp.moveaxis(out, 0, 1).reshape(batch, blocks * chunk, *out.shape[3:])[:, :seq]


def check_implementation(implementation: str | None) -> None:
  """Refuses an unknown ``attention_implementation`` in one line naming the valid ones."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"unknown attention_implementation {implementation!r}; valid: {ATTENTION_IMPLEMENTATIONS}"
    )


def mask_segment_ids(segment_ids, attention_mask, shape: tuple[int, int]) -> jax.Array:
  """Segment ids ``[batch, seq]`` that say, for every real token, what the dense mask of
  ``segment_ids`` (packed rows, ``None``: one sequence a row) and ``attention_mask`` (``0``:
  a hidden key) says: the rows' ids, and ``0`` wherever a key is hidden (ids not above 0,
  ``attention_mask`` 0). A hidden token then sees the hidden tokens of its row only; its
  output is not used.

  Example:
    >>> import numpy as np
    >>> ids = mask_segment_ids(jnp.array([[1, 1, 2, 2]]), jnp.array([[1, 0, 1, 1]]), (1, 4))
    >>> np.asarray(ids).tolist()
    [[1, 0, 2, 2]]
  """
  seg = jnp.ones(shape, jnp.int32)
  if segment_ids is not None:
    seg = jnp.asarray(segment_ids, jnp.int32)
    seg = jnp.where(seg > 0, seg, 0)
  if attention_mask is not None:
    seg = jnp.where(jnp.asarray(attention_mask).astype(bool), seg, 0)
  return seg


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
