"""Activation functions by their transformers ``hidden_act`` names."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
  """transformers' ``"gelu"``: ``x * Phi(x)`` with the exact normal CDF ``Phi`` (via ``erf``).

  The same values as ``jax.nn.gelu(x, approximate=False)``; its gradient ``Phi(x) + x phi(x)``
  reuses the forward pass's ``Phi(x)`` instead of differentiating through ``erf`` again, which
  XLA:CPU otherwise evaluates a second time in the backward pass (about 8% of a BERT FFN's
  forward + backward on CPU; ``bench/NOTES.md``).

  Example:
    >>> x = jnp.linspace(-3.0, 3.0, 7)
    >>> bool(jnp.allclose(gelu_exact(x), jax.nn.gelu(x, approximate=False), atol=1e-6))
    True
    >>> g = jax.grad(lambda x: gelu_exact(x).sum())(x)
    >>> ref = jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(x)
    >>> bool(jnp.allclose(g, ref, atol=1e-6))
    True
  """
  return _gelu_fwd(x)[0]


def _gelu_fwd(x):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype))
  return x * cdf, (x, cdf)


def _gelu_bwd(residuals, g):
  x, cdf = residuals
  pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
  return (g * (cdf + x * pdf).astype(g.dtype),)


gelu_exact.defvjp(_gelu_fwd, _gelu_bwd)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": gelu_exact,
  "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
  "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
}


def activation(name: str, where: str) -> Callable[[jax.Array], jax.Array]:
  """The function for ``hidden_act=name``; ``where`` names the config in the error.

  Example:
    >>> activation("silu", "llama config")(jnp.zeros(2)).tolist()
    [0.0, 0.0]
    >>> activation("swish2", "llama config")
    Traceback (most recent call last):
    ...
    ValueError: unsupported hidden_act 'swish2' in the llama config; supported: gelu, ...
  """
  if name not in ACTIVATIONS:
    raise ValueError(
      f"unsupported hidden_act {name!r} in the {where}; supported: {', '.join(sorted(ACTIVATIONS))}"
    )
  return ACTIVATIONS[name]
