"""One adapter from several: PEFT's ``add_weighted_adapter``, as a pure function on trees.

Three ways, as PEFT computes them (``s_i`` is adapter ``i``'s scale, ``w_i`` its weight), each
giving an adapter of scale 1 (``alpha = rank``, as PEFT sets it):

``"linear"``
  The same rank ``r`` everywhere: ``A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i`` and
  ``B = sum_i sqrt|w_i s_i| B_i``. Not the weighted sum of the updates (cross terms ``A_i B_j``
  remain); cheap, and what PEFT calls linear.
``"cat"``
  The ranks concatenated: ``A = [w_1 s_1 A_1, w_2 s_2 A_2, ...]``, ``B = [B_1; B_2; ...]``, so
  ``A @ B = sum_i w_i s_i A_i B_i`` exactly; the rank is the sum of the adapters' ranks (zero
  columns where an adapter has no module).
``"svd"``
  ``sum_i w_i s_i A_i B_i`` truncated to rank ``svd_rank`` (default: the largest rank) by its
  singular value decomposition: the best rank-``r`` approximation of the weighted sum.

A module that only some of the adapters adapt combines those (as PEFT does). PEFT's other ways
(TIES, DARE, magnitude pruning) are not implemented.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src.bank import same_layout
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import LoraSpec

COMBINATIONS = ("linear", "cat", "svd")


def _flat(spec: LoraSpec, a, b):
  """``a [*stack, *in, r]``, ``b [*stack, r, *out]`` as ``[S, in, r]``, ``[S, r, out]``."""
  stack = a.shape[: spec.stacked]
  s = math.prod(stack)
  a2 = jnp.reshape(jnp.asarray(a, jnp.float32), (s, -1, a.shape[-1]))
  b2 = jnp.reshape(jnp.asarray(b, jnp.float32), (s, b.shape[spec.stacked], -1))
  return a2, b2


def _unflat(spec: LoraSpec, a_like, b_like, a2, b2, rank: int):
  stack = a_like.shape[: spec.stacked]
  a_shape = (*a_like.shape[:-1], rank)
  b_shape = (*stack, rank, *b_like.shape[spec.stacked + 1 :])
  return jnp.reshape(a2, a_shape), jnp.reshape(b2, b_shape)


def _combine(kind: str, parts, rank: int):
  """``parts``: ``[(a [S, in, r_i], b [S, r_i, out], w_i * s_i)]`` -> ``(a, b)`` of ``rank``."""
  if kind == "linear":
    a = sum(np.sign(ws) * math.sqrt(abs(ws)) * a for a, _, ws in parts)
    b = sum(math.sqrt(abs(ws)) * b for _, b, ws in parts)
    return a, b
  if kind == "cat":
    a = jnp.concatenate([ws * a for a, _, ws in parts], axis=-1)
    b = jnp.concatenate([b for _, b, _ in parts], axis=1)
    pad = rank - a.shape[-1]
    return jnp.pad(a, ((0, 0), (0, 0), (0, pad))), jnp.pad(b, ((0, 0), (0, pad), (0, 0)))
  delta = sum(ws * jnp.einsum("sir,sro->sio", a, b) for a, b, ws in parts)
  u, sv, vh = jnp.linalg.svd(delta, full_matrices=False)  # delta = u diag(sv) vh, [S, in, out]
  k = min(rank, sv.shape[-1])
  a = u[..., :k]  # the singular values go to B, as PEFT puts them ([out, in] = (U S) Vh)
  b = sv[:, :k, None] * vh[:, :k, :]
  if k < rank:  # a rank above the update's own: zero columns, as PEFT's zero-initialised tail
    a = jnp.pad(a, ((0, 0), (0, 0), (0, rank - k)))
    b = jnp.pad(b, ((0, 0), (0, rank - k), (0, 0)))
  return a, b


def weighted_adapter(
  adapted: Sequence,
  weights: Sequence[float],
  *,
  combination_type: str = "svd",
  svd_rank: int | None = None,
):
  """One adapter combining ``adapted``'s, weighted: PEFT's ``add_weighted_adapter``.

  Args:
    adapted: trees over the same base, each with its adapters (from :func:`lora_jax.lora_init`,
      :func:`lora_jax.load_adapter`, :func:`lora_jax.import_peft` or
      :func:`lora_jax.bank_adapter`).
    weights: one float per tree.
    combination_type: ``"linear"`` (all adapters of one rank), ``"cat"`` or ``"svd"``; see the
      module docstring.
    svd_rank: the rank of an ``"svd"`` combination (default: the largest rank).

  Returns:
    The first tree with each adapted module's adapter replaced by the combination (scale 1),
    modules adapted by any of the trees included.

  Raises:
    ValueError: an unknown ``combination_type``, a count of weights that differs, ``"linear"``
      over adapters of different ranks, DoRA adapters, or adapters that split a weight
      differently.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    >>> import lora_jax
    >>> base = nn.Dense(6).init(jax.random.key(0), jnp.ones((1, 5)))
    >>> one, two = (lora_jax.lora_init(base, lora_jax.LoraRule(".*", rank=2), rng=jax.random.key(k))
    ...             for k in (1, 2))
    >>> two["params"]["lora_b"] = jnp.ones((2, 6))  # as if trained
    >>> both = lora_jax.weighted_adapter([one, two], [0.5, 2.0], combination_type="cat")
    >>> both["params"]["lora_a"].shape
    (5, 4)
    >>> merged, alone = lora_jax.merge(both), lora_jax.merge(two)
    >>> delta = alone["params"]["kernel"] - base["params"]["kernel"]
    >>> bool(np.allclose(merged["params"]["kernel"] - base["params"]["kernel"], 2.0 * delta,
    ...                  atol=1e-5))
    True
  """
  if combination_type not in COMBINATIONS:
    raise ValueError(
      f"weighted_adapter combination_type={combination_type!r} is not one of {list(COMBINATIONS)}"
    )
  if not adapted or len(weights) != len(adapted):
    raise ValueError(
      f"weighted_adapter needs one weight per adapter: {len(adapted)} adapters, "
      f"{len(weights)} weights"
    )
  trees = [paths.split_params(t)[0] for t in adapted]
  rebuild = paths.split_params(adapted[0])[1]
  found = [{p: m for p, m in paths.iter_modules(t) if LORA_SPEC in m} for t in trees]
  if not any(found):
    raise ValueError("weighted_adapter: the trees carry no adapters")
  for i, f in enumerate(found):
    dora = [p for p, m in f.items() if m[LORA_SPEC].use_dora]
    if dora:
      raise ValueError(f"adapted[{i}] holds a DoRA adapter at {dora[0]!r}: not supported here")
  ranks = [max((m[LORA_SPEC].rank for m in f.values()), default=0) for f in found]
  if combination_type == "linear" and len({r for r, f in zip(ranks, found, strict=True) if f}) > 1:
    raise ValueError(
      f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; use 'cat' or 'svd'"
    )
  rank = {"linear": max(ranks), "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
  if rank < 1 or isinstance(rank, bool) or not isinstance(rank, int):
    raise ValueError(f"weighted_adapter svd_rank={svd_rank!r} must be a positive int")

  def combine(path: str, module: dict) -> dict:
    present = [(f[path], w) for f, w in zip(found, weights, strict=True) if path in f]
    if not present:
      return module
    named = {f"adapted[{i}]": f[path][LORA_SPEC] for i, f in enumerate(found) if path in f}
    first = same_layout(path, named)
    parts = []
    for m, w in present:
      a2, b2 = _flat(m[LORA_SPEC], m[LORA_A], m[LORA_B])
      parts.append((a2, b2, float(w) * m[LORA_SPEC].scale))
    a2, b2 = _combine(combination_type, parts, rank)
    ref = present[0][0]
    a, b = _unflat(first, ref[LORA_A], ref[LORA_B], a2, b2, rank)
    out = {k: v for k, v in module.items() if k not in (LORA_A, LORA_B, LORA_SPEC, LORA_MAGNITUDE)}
    out[LORA_A], out[LORA_B] = a, b
    out[LORA_SPEC] = dataclasses.replace(
      first,
      rank=rank,
      alpha=float(rank),
      rslora=False,
      rule=f"weighted_adapter {combination_type}",
      init="gaussian",
    )
    return out

  return rebuild(paths.map_modules(combine, trees[0]))
