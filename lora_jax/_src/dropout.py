"""LoRA dropout: masks drawn from 16 random bits per entry.

``jax.random.bernoulli`` draws a float32 uniform per entry, and with JAX's default
(partitionable) threefry each 32-bit word costs a whole threefry2x32 block. LoRA dropout masks
the input of every adapted layer, so on CPU dropout 0.05 made an all-linear SmolLM2 step 26%
slower (``bench/NOTES.md`` entry 27; 18% with these masks). Here each 32-bit word gives two
entries their 16 bits: half the work, for any key implementation. The rate is rounded to a
multiple of ``2**-16`` (``0.05`` becomes ``3277 / 65536``, off by less than ``8e-6``) and the kept
entries are divided by the rounded keep probability, so the expected output is the input
exactly.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from lora_jax._src import dropout
  >>> dropout.threshold(0.05)
  3277
  >>> y = dropout.apply(jax.random.key(0), 0.5, jnp.ones((4, 1000)))
  >>> sorted(set(y.ravel().tolist()))  # dropped, or kept and divided by 1 - 0.5
  [0.0, 2.0]
  >>> 0.45 < float((y == 0).mean()) < 0.55
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

BITS = 16
LEVELS = 1 << BITS  # a mask entry is dropped when its 16 bits fall below the threshold


def threshold(rate: float) -> int:
  """``round(rate * 2**16)``: the number of the 65536 values of 16 bits that drop an entry.

  Raises ``ValueError`` for a rate outside ``[0, 1)`` or one that rounds to never or always
  dropping (from 0 to ``2**-17``, about ``7.6e-6``, or from ``1 - 2**-17``)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"LoRA dropout rate {rate!r} must be in [0, 1)")
  t = round(rate * LEVELS)
  if rate > 0.0 and not 0 < t < LEVELS:
    raise ValueError(
      f"LoRA dropout rate {rate!r} rounds to {t / LEVELS} at the masks' resolution of 2**-16: "
      f"use 0 or a rate above 2**-17 ({0.5 / LEVELS:.3g}) and below 1 - 2**-17"
    )
  return t


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
  """A boolean mask of ``shape``, each entry ``True`` with probability ``1 - threshold(rate) /
  2**16``, independently. The random words have ``shape``'s leading axes, so a mask for an
  input sharded over its batch axis is drawn sharded too."""
  t = threshold(rate)
  *lead, last = shape if shape else (1,)
  words = jax.random.bits(key, (*lead, -(-last // 2)), jnp.uint32)
  halves = lax.bitcast_convert_type(words, jnp.uint16)  # [..., ceil(last / 2), 2]
  halves = halves.reshape(*lead, 2 * words.shape[-1])[..., :last].reshape(shape)
  return halves >= jnp.uint16(t)


def apply(key: jax.Array, rate: float, x: jax.Array) -> jax.Array:
  """``x`` with each entry zeroed with probability ``threshold(rate) / 2**16`` and the others
  divided by the probability of keeping one (in ``x``'s dtype)."""
  t = threshold(rate)
  if t == 0:
    return x
  keep = keep_mask(key, rate, x.shape)
  return jnp.where(keep, x * (LEVELS / (LEVELS - t)), jnp.zeros_like(x))
