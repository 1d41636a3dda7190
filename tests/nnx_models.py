"""Small Flax NNX models built only from flax's own layers, for the NNX tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

VOCAB, DIM, HEADS = 40, 16, 2


class Zoo(nnx.Module):
  """Every layer kind the NNX low-rank path runs: ``nnx.Embed`` (lookup and ``attend``),
  ``nnx.Conv``, ``nnx.MultiHeadAttention`` (four ``nnx.LinearGeneral``), ``nnx.Einsum`` and
  ``nnx.Linear``."""

  def __init__(self, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = nnx.Embed(VOCAB, DIM, **kw)
    self.conv = nnx.Conv(DIM, DIM, kernel_size=(3,), padding="SAME", **kw)
    self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, deterministic=True, **kw)
    self.mix = nnx.Einsum("btd,dhk->bthk", (DIM, HEADS, DIM // HEADS), **kw)
    self.up = nnx.Linear(DIM, 2 * DIM, **kw)
    self.down = nnx.Linear(2 * DIM, DIM, **kw)

  def __call__(self, ids):
    h = self.embed(ids)
    h = h + self.conv(h)
    h = h + self.attn(h)
    h = h + self.mix(h).reshape(h.shape)
    h = h + self.down(jax.nn.gelu(self.up(h)))
    return self.embed.attend(h)


def ids(batch: int = 2, length: int = 6, seed: int = 0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)
