"""What every module of a model family shares: its config, dtypes and how it builds a Dense."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn


class Block(nn.Module):
  """A module of a model family: the family's config, the compute and parameter dtypes.

  Example:
    >>> import jax, types
    >>> class Proj(Block):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return self.dense(3, "proj", use_bias=False)(x)
    >>> cfg = types.SimpleNamespace(initializer_range=0.02)
    >>> variables = Proj(cfg).init(jax.random.key(0), jnp.ones((1, 4)))
    >>> jax.tree.map(jnp.shape, variables["params"])
    {'proj': {'kernel': (4, 3)}}
  """

  config: Any
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """An ``nn.Dense`` initialised as transformers does (``normal(initializer_range)``)."""
    return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(self.config.initializer_range),
      name=name,
    )

  def child(self, cls: type[Block], name: str, **fields) -> Block:
    """``cls`` with this module's config and dtypes (and ``fields``), named ``name``."""
    return cls(self.config, self.dtype, self.param_dtype, name=name, **fields)
