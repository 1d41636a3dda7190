"""int8 codes: one absmax per output unit, ``round(127 * w / absmax)`` in the kernel's layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def quantize_layer(kernel: jax.Array):
  """``(codes, absmax, None, None)`` of one ``[in, out]`` kernel."""
  w = kernel.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(w), axis=0)
  scale = jnp.where(absmax > 0, 127.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  codes = jnp.clip(jnp.round(w * scale), -127, 127).astype(jnp.int8)
  return codes, absmax, None, None


def dequantize(codes, absmax) -> jax.Array:
  """float32 kernels (leading stacked axes kept) from their codes and per-column absmaxes."""
  return codes.astype(jnp.float32) * (absmax / 127.0)[..., None, :]
