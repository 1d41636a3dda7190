"""NF4 codes (QLoRA; bitsandbytes' ``quantize_4bit(quant_type="nf4")``), one layer at a time.

Blocks of ``block_size`` values of the weight as transformers stores it (``[out, in]``), each
with its absmax, each value the nearest of 16 NormalFloat levels, two per byte; with double
quantization the absmaxes themselves become 8-bit codes of bitsandbytes' dynamic map (see
:mod:`lora_jax.quant.array` for the stored layout).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.quant.array import QuantizedArray

ABSMAX_BLOCK = 256  # double quantization: block size of the absmaxes' own quantization


# The 16 NormalFloat levels (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with
# an exact zero; as float32, the table bitsandbytes dequantizes with.
NF4_LEVELS = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)


# A value goes to the level whose midpoint interval holds it; on a midpoint, to the lower one.
_NF4_BOUNDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)


def _dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``), 256 sorted values.

  For exponent ``e = 0..6`` the midpoints of ``2^e`` equal steps over ``[0.1, 1]``, times
  ``10^(e-6)``, with both signs; then 0 and 1. Computed in float64 and rounded once, so an entry
  may be one float32 ulp from bitsandbytes' own (which rounds each step in float32).
  """
  values = [0.0, 1.0]
  for e in range(7):
    k = np.arange(2**e, dtype=np.float64)
    means = 0.1 + 0.9 * (k + 0.5) / 2**e
    values += list(10.0 ** (e - 6) * means) + list(-(10.0 ** (e - 6)) * means)
  return np.sort(np.array(values).astype(np.float32))


DYNAMIC_MAP = _dynamic_map()


_GRID = 65536


# The dynamic-map level nearest to each grid point -1 + 2 i / (_GRID - 1) (ties: the lower).
_GRID_LEVEL = np.searchsorted(
  (np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])).astype(np.float32),
  (np.float32(-1) + np.float32(2) * np.arange(_GRID, dtype=np.float32) / np.float32(_GRID - 1)),
  side="left",
).astype(np.uint8)


def _blocks(x: jax.Array, block: int) -> tuple[jax.Array, int]:
  """Flat ``x`` zero-padded to whole blocks, as ``[blocks, block]``; and its length."""
  n = x.shape[0]
  blocks = -(-n // block)
  return jnp.pad(x, (0, blocks * block - n)).reshape(blocks, block), n


def _dynamic_codes(normed: jax.Array) -> jax.Array:
  """The dynamic-map index of each ``normed`` value in ``[-1, 1]``, as uint8.

  As bitsandbytes' CPU kernel: the value is rounded to one of 65,536 evenly spaced points of
  ``[-1, 1]`` and takes the level nearest to that point (the nearest level to the value itself,
  except within half a grid step, 1.5e-5, of a midpoint between two levels).
  """
  v = jnp.clip(normed, -1.0, 1.0)
  point = ((v + 1.0) * 0.5 * (_GRID - 1) + 0.5).astype(jnp.int32)
  return jnp.asarray(_GRID_LEVEL)[point]


def _absmax_quant(absmax: jax.Array, offset=None):
  """Double quantization of NF4 absmaxes: (uint8 codes, float32 absmax2, float32 offset).

  ``offset`` is the absmaxes' float32 mean; its last bit depends on the order of the sum, so
  bitsandbytes' (a PyTorch sum) may differ from ours by an ulp or two: tests pass theirs in.
  """
  offset = jnp.mean(absmax) if offset is None else jnp.asarray(offset, jnp.float32)
  blocks, n = _blocks(absmax - offset, ABSMAX_BLOCK)
  absmax2 = jnp.max(jnp.abs(blocks), axis=1)
  inverse = 1.0 / jnp.where(absmax2 > 0, absmax2, 1.0)
  codes = jnp.where(absmax2[:, None] > 0, _dynamic_codes(blocks * inverse[:, None]), 0)
  return codes.reshape(-1)[:n].astype(jnp.uint8), absmax2, offset


def _absmax_dequant(codes, absmax2, offset) -> jax.Array:
  n = codes.shape[-1]
  values = jnp.take(jnp.asarray(DYNAMIC_MAP), codes.astype(jnp.int32), axis=0)
  scale = jnp.repeat(absmax2, ABSMAX_BLOCK, axis=-1)[..., :n]
  return values * scale + offset[..., None]


@functools.partial(jax.jit, static_argnames=("block_size", "double_quant"))
def quantize_layer(kernel: jax.Array, block_size: int, double_quant: bool):
  # Blocks over the weight as transformers stores it: kernel.T ([out, in]), row-major.
  flat = kernel.T.astype(jnp.float32).reshape(-1)
  blocks, n = _blocks(flat, block_size)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  safe = jnp.maximum(absmax, 1e-38)[:, None]
  # bitsandbytes multiplies whole blocks by 1/absmax, and divides a trailing partial block.
  partial = n % block_size != 0
  last = jnp.arange(blocks.shape[0])[:, None] == blocks.shape[0] - 1
  scaled = jnp.where(partial & last, blocks / safe, blocks * (1.0 / safe))
  scaled = jnp.clip(scaled, -1.0, 1.0).reshape(-1)[: n + n % 2]  # an odd count pads with 0
  idx = jnp.sum(scaled[:, None] > jnp.asarray(_NF4_BOUNDS), axis=1).astype(jnp.uint8)
  pairs = idx.reshape(-1, 2)
  codes = (pairs[:, 0] << 4) | pairs[:, 1]
  if not double_quant:
    return codes, absmax, None, None
  return codes, *_absmax_quant(absmax)


def dequantize_layers(q: QuantizedArray, codes, absmax, absmax2, offset):
  """float32 ``[..., out, in]`` from one or more layers' NF4 children (leading axes kept)."""
  lead = codes.shape[:-1]
  out_features, in_features = q.layer_shape[1], q.layer_shape[0]
  n = in_features * out_features
  if q.double_quant:
    absmax = _absmax_dequant(absmax, absmax2, offset)
  idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*lead, -1)
  values = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32), axis=0)
  blocks = absmax.shape[-1]
  values = values[..., :n]
  values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, blocks * q.block_size - n)])
  w = values.reshape(*lead, blocks, q.block_size) * absmax[..., None]
  return w.reshape(*lead, -1)[..., :n].reshape(*lead, out_features, in_features)
