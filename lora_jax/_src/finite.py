"""Refusing to write non-finite weights: a diverged adapter is never saved or exported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_finite(flat: Mapping[str, Any], action: str) -> None:
  """Raises if a floating leaf of ``flat`` (``"a/b/c"`` path -> array) holds NaN or inf.

  Leaves without values (tracers, ``jax.ShapeDtypeStruct``) and non-float leaves pass.

  Raises:
    FloatingPointError: names the first such leaf, how many of its values are not finite, and
      ``action`` (what was refused).

  Example:
    >>> check_finite({"params/dense/lora_a": np.ones(3)}, "save the adapter")
    >>> check_finite({"params/dense/lora_b": np.array([1.0, np.nan])}, "save the adapter")
    Traceback (most recent call last):
    ...
    FloatingPointError: refusing to save the adapter: params/dense/lora_b holds 1 non-finite ...
  """
  for path, value in flat.items():
    if isinstance(value, (jax.core.Tracer, jax.ShapeDtypeStruct)) or not hasattr(value, "dtype"):
      continue
    if not jnp.issubdtype(value.dtype, jnp.inexact):
      continue
    bad = int(np.size(value) - np.count_nonzero(np.isfinite(np.asarray(value, np.float32))))
    if bad:
      raise FloatingPointError(
        f"refusing to {action}: {path} holds {bad} non-finite value(s) (NaN or inf) of "
        f"{np.size(value)}; the training diverged (lower the learning rate)"
      )
