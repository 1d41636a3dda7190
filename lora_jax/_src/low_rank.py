"""The adapter's contribution to a module's output, ``scale * (x @ A) @ B``, as pure functions.

Shared by the two low-rank paths, Flax linen (:mod:`lora_jax._src.apply`) and Flax NNX
(:mod:`lora_jax.nnx`): each works out which of the input's axes a module contracts and hands
the arrays here. Every function returns the contribution in ``dtype`` (the module output's).
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp

from lora_jax._src.spec import LoraSpec


def matmul(x, w, n: int = 1):
  """Contracts the last ``n`` axes of ``x`` with the first ``n`` of ``w``, as one 2-D matmul.

  On ``[rows, k]`` views (a free reshape of contiguous axes) the gradient's contractions are
  2-D as well, ``dw = x2^T @ g2`` over the rows. Contracting the batch and sequence axes as two
  axes instead, XLA:CPU rewrites that dot with its contracting axes last and writes a
  transposed copy of the activation-sized cotangent ``g`` (with the elementwise ops before it,
  e.g. GELU's derivative, recomputed into the copy) for every adapter: bench/NOTES.md entry 22.
  """
  rows, k = x.shape[: x.ndim - n], math.prod(x.shape[x.ndim - n :])
  y = x.reshape(math.prod(rows), k) @ w.reshape(k, math.prod(w.shape[n:]))
  return y.reshape(*rows, *w.shape[n:])


def contracted_last(x, x_axes):
  """``x`` with the axes in ``x_axes`` moved last, in that order (a no-op for the usual
  ``(-1,)``)."""
  x_axes = tuple(ax % x.ndim for ax in x_axes)
  kept = tuple(i for i in range(x.ndim) if i not in x_axes)
  if kept + x_axes != tuple(range(x.ndim)):
    x = jnp.transpose(x, kept + x_axes)
  return x


def dense(x, a, b, spec: LoraSpec, dtype, x_axes=(-1,)):
  """A dense layer's contribution; ``x_axes`` are the input axes it contracts (``axis``)."""
  x = contracted_last(x.astype(dtype), tuple(x_axes))
  t = matmul(x, a.astype(dtype), len(tuple(x_axes)))
  return matmul(t * spec.scale, b.astype(dtype))


def einsum(eq: str, x, a, b, spec: LoraSpec, dtype):
  """An einsum layer's contribution for the equation ``eq`` (``"lhs,kernel->out"``)."""
  eq = eq.replace(" ", "")
  lhs, rest = eq.split(",")
  rhs, out = rest.split("->")
  ins = "".join(rhs[i] for i in spec.in_axes)
  outs = "".join(rhs[o] for o in spec.out_axes)
  kept = re.sub(f"[{ins}]", "", lhs)
  # x as [kept..., ins...] (an identity for the usual 'btd,...' equations), then 2-D matmuls
  x = jnp.einsum(f"{lhs}->{kept}{ins}", x.astype(dtype))
  t = matmul(x, a.astype(dtype), len(ins))
  y = matmul(t * spec.scale, b.astype(dtype))
  return jnp.einsum(f"{kept}{outs}->{out}", y)


def embed_lookup(ids, a, b, spec: LoraSpec, dtype):
  """An embedding's contribution for token ``ids``: ``scale * A[ids] @ B``."""
  return matmul(jnp.take(a, ids, axis=0).astype(dtype) * spec.scale, b.astype(dtype))


def embed_attend(query, a, b, spec: LoraSpec, dtype):
  """``attend``'s: ``query @ (E + s A B)^T = query @ E^T + s (query @ B^T) @ A^T``."""
  q = query.astype(dtype)
  return matmul(matmul(q, b.astype(dtype).T) * spec.scale, a.astype(dtype).T)
