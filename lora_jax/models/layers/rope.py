"""Rotary position embeddings (RoPE) as the Llama family's configs describe them.

A config names its RoPE in one of two spellings: transformers 4's ``rope_theta`` plus an
optional ``rope_scaling`` dict (``{"type" | "rope_type": ..., "factor": ...}``), or
transformers 5's ``rope_parameters`` (``{"rope_type": ..., "rope_theta": ..., ...}``).
:func:`rope_settings` reads either into a :class:`Rope`; :func:`inverse_frequencies` computes
the per-pair frequencies as transformers does (``default``, ``linear`` and ``llama3``; other
types are refused by name), and :func:`apply_rope` rotates queries and keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class Rope:
  """RoPE settings: ``theta``, ``rope_type`` and the scaling parameters that type uses."""

  theta: float
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


def config_value(config: Any, name: str, default: Any = None) -> Any:
  """``config.name`` of a transformers config object, or ``config[name]`` of its dict form."""
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def rope_settings(config: Any) -> Rope:
  """The :class:`Rope` of a transformers config (object or dict), from either spelling.

  Raises:
    ValueError: a RoPE type lora_jax does not implement (named, with the valid ones), a
      missing parameter of the type, or partial rotary embeddings.

  Example:
    >>> rope_settings({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
    ...   "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    ...   "original_max_position_embeddings": 8192}}).rope_type
    'llama3'
    >>> rope_settings({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}).theta
    100000.0
  """
  params = config_value(config, "rope_parameters")
  if isinstance(params, Mapping) and "rope_theta" in params:
    where = "rope_parameters"
    scaling = dict(params)
    theta = scaling.pop("rope_theta")
  else:
    where = "rope_scaling"
    theta = config_value(config, "rope_theta", 10000.0)
    scaling = dict(config_value(config, "rope_scaling") or {})
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(
      f"unsupported RoPE type {rope_type!r} (config {where}); supported: {', '.join(ROPE_TYPES)}"
    )
  partial = scaling.get("partial_rotary_factor", config_value(config, "partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise ValueError(f"unsupported partial_rotary_factor {partial!r} (config); supported: 1.0")
  kw: dict[str, Any] = {}
  needed = {"default": (), "linear": ("factor",), "llama3": _LLAMA3_KEYS}[rope_type]
  for key in needed:
    if key not in scaling:
      raise ValueError(f"RoPE type {rope_type!r} needs {key!r} in the config's {where}")
    kw[key] = scaling[key]
  return Rope(theta=float(theta), rope_type=rope_type, **kw)


def inverse_frequencies(rope: Rope, head_dim: int) -> np.ndarray:
  """``[head_dim // 2]`` float32 inverse frequencies, as transformers' RoPE init functions.

  Example:
    >>> inverse_frequencies(Rope(theta=10000.0), 4).tolist()
    [1.0, 0.009999999776482582]
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
  if rope.rope_type == "linear":
    return (inv / np.float32(rope.factor)).astype(np.float32)
  if rope.rope_type == "llama3":
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def cos_sin(inv_freq: np.ndarray, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """``cos`` and ``sin`` ``[..., head_dim]`` for integer ``positions`` (computed in float32)."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x`` ``[batch, seq, heads, head_dim]`` by ``cos``/``sin`` ``[batch, seq, head_dim]``.

  transformers' ``x * cos + rotate_half(x) * sin``, with the two halves of the last axis as the
  pairs that rotate together.
  """
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
