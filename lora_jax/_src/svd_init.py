"""PiSSA and OLoRA: adapters that start from the weight's own principal directions.

Both take their factors from a decomposition of the frozen weight ``W`` (as transformers stores
it, ``[out, in]``; for a kernel with more axes, the input axes flattened into ``in`` and the
output axes into ``out``) and replace the weight by the *residual* ``W - s * B_t @ A_t``
(``s`` the adapter's scale, ``A_t = lora_a.T``, ``B_t = lora_b.T``), so that the model's outputs
are unchanged at step 0 while training starts in the subspace that matters most:

* ``"pissa"`` (Meng et al. 2024, PEFT's ``init_lora_weights="pissa"``): ``W = U S V^T``, the top
  ``r`` singular triplets, ``A_t = sqrt(S_r / s) V_r^T``, ``B_t = U_r sqrt(S_r / s)``; the
  residual holds the other singular directions.
* ``"pissa_niter_K"`` (PEFT's fast variant): the same with the top triplets from a randomized
  range finder (Halko, Martinsson and Tropp 2011, algorithm 4.4) with ``K`` subspace iterations
  and a few oversampling columns. It does not reproduce torch's ``svd_lowrank`` bit for bit.
* ``"olora"`` (Büyükakyüz 2024): ``W = Q R`` (reduced QR), ``B_t = Q[:, :r]``,
  ``A_t = R[:r]``, undivided by the scale, as PEFT does.

Everything runs in float32 (matrix products at the highest precision); the residual is cast back
to the weight's dtype. Scanned layers (``stacked`` leading axes) are decomposed one layer at a
time. Embeddings are refused (PEFT has no PiSSA/OLoRA for them either).

Because the base weights change, the trained adapter only fits the residual: export it with
``export_peft(..., initial=<the tree right after lora_init>)``, which writes the rank-``2r``
plain LoRA ``[A, A0]``, ``[B; -B0]`` relative to the original weights
(:func:`relative_to_original`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax._src import inits
from lora_jax._src.spec import LoraSpec

OVERSAMPLE = 8  # extra random columns of the range finder, dropped after the small SVD
_HIGHEST = lax.Precision.HIGHEST


def is_svd_init(init: str) -> bool:
  """Whether ``init`` rewrites the base weight (PiSSA, its fast variant, OLoRA)."""
  return inits.parse(init).rewrites_base


def check(path: str, spec: LoraSpec, shape) -> None:
  """Refuses what PiSSA/OLoRA cannot initialise, before any decomposition runs."""
  if spec.weight != "kernel":
    raise ValueError(
      f"init={spec.init!r} cannot initialise the adapter of {path}/{spec.weight}: PiSSA and OLoRA "
      "decompose linear kernels only (PEFT has them for Linear layers only); use "
      "init='gaussian' or 'kaiming_uniform' for this module (a second LoraRule, or exclude=)"
    )
  layer = shape[spec.stacked :]
  n_in = math.prod(layer[i] for i in spec.in_axes)
  n_out = math.prod(layer[o] for o in spec.out_axes)
  if spec.rank > min(n_in, n_out):
    raise ValueError(
      f"rank {spec.rank} with init={spec.init!r} exceeds the {min(n_in, n_out)} singular "
      f"directions of {path}/kernel of shape {tuple(shape)} (min(inputs={n_in}, "
      f"outputs={n_out})); use a rank of at most {min(n_in, n_out)}"
    )


def _matrix(spec: LoraSpec, w) -> jax.Array:
  """One layer's weight as the float32 ``[n_in, n_out]`` matrix (Flax's ``[in, out]``)."""
  order = spec.in_axes + spec.out_axes
  n_in = math.prod(w.shape[i] for i in spec.in_axes)
  return jnp.reshape(jnp.transpose(w.astype(jnp.float32), order), (n_in, -1))


def _unmatrix(spec: LoraSpec, m, shape) -> jax.Array:
  """Inverse of :func:`_matrix`: back to the weight's axes."""
  order = spec.in_axes + spec.out_axes
  m = jnp.reshape(m, tuple(shape[i] for i in order))
  return jnp.transpose(m, tuple(order.index(i) for i in range(len(order))))


def randomized_svd(m: jax.Array, rank: int, iterations: int, key, oversample: int = OVERSAMPLE):
  """Top ``rank`` singular triplets ``(U_r, S_r, Vh_r)`` of ``m`` by a randomized range finder.

  A Gaussian test matrix with ``rank + oversample`` columns, ``iterations`` rounds of subspace
  iteration (re-orthonormalised each half step), then the exact SVD of the small projection.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (40, 12)))
    >>> v, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(1), (30, 12)))
    >>> m = (u * 0.5 ** jnp.arange(12)) @ v.T
    >>> _, s, _ = randomized_svd(m, 3, 2, jax.random.key(2))
    >>> [round(float(x), 4) for x in s]
    [1.0, 0.5, 0.25]
  """
  k = min(rank + oversample, *m.shape)
  mm = functools.partial(jnp.matmul, precision=_HIGHEST)
  q, _ = jnp.linalg.qr(mm(m, jax.random.normal(key, (m.shape[1], k), jnp.float32)))
  for _ in range(iterations):
    z, _ = jnp.linalg.qr(mm(m.T, q))
    q, _ = jnp.linalg.qr(mm(m, z))
  u, s, vh = jnp.linalg.svd(mm(q.T, m), full_matrices=False)
  return mm(q, u)[:, :rank], s[:rank], vh[:rank]


@functools.partial(jax.jit, static_argnames=("spec", "init"))
def _layer(spec: LoraSpec, init: str, w, key):
  """``(lora_a, lora_b, residual)`` for one unstacked layer's weight ``w``."""
  r, s = spec.rank, spec.scale
  wt = _matrix(spec, w).T  # transformers' [out, in]
  if init == "olora":
    q, rr = jnp.linalg.qr(wt)
    b_t, a_t = q[:, :r], rr[:r]
  else:
    if init == "pissa":
      u, sv, vh = jnp.linalg.svd(wt, full_matrices=False)
      u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
      u, sv, vh = randomized_svd(wt, r, inits.parse(init).niter, key)
    root = jnp.sqrt(sv / s)
    b_t, a_t = u * root, root[:, None] * vh
  residual = wt - s * jnp.matmul(b_t, a_t, precision=_HIGHEST)
  in_shape = tuple(w.shape[i] for i in spec.in_axes)
  out_shape = tuple(w.shape[o] for o in spec.out_axes)
  a = jnp.reshape(a_t.T, (*in_shape, r))
  b = jnp.reshape(b_t.T, (r, *out_shape))
  return a, b, _unmatrix(spec, residual.T, w.shape).astype(w.dtype)


def factors(spec: LoraSpec, weight, key):
  """``(lora_a, lora_b, residual weight)`` for ``spec.init``; shapes only for abstract leaves."""
  if isinstance(weight, jax.ShapeDtypeStruct):
    a_shape, b_shape = spec.a_shape(weight.shape), spec.b_shape(weight.shape)
    return (
      jax.ShapeDtypeStruct(a_shape, jnp.float32),
      jax.ShapeDtypeStruct(b_shape, jnp.float32),
      weight,
    )
  weight = jnp.asarray(weight)
  layer = dataclasses.replace(spec, stacked=0)
  stack = weight.shape[: spec.stacked]
  if not stack:
    return _layer(layer, spec.init, weight, key)
  # Scanned layers: one independent decomposition per slice (and its own random key).
  flat = jnp.reshape(weight, (-1, *weight.shape[spec.stacked :]))
  keys = jax.random.split(key, flat.shape[0])
  a, b, res = jax.vmap(lambda w, k: _layer(layer, spec.init, w, k))(flat, keys)
  return (
    jnp.reshape(a, (*stack, *a.shape[1:])),
    jnp.reshape(b, (*stack, *b.shape[1:])),
    jnp.reshape(res, weight.shape),
  )


def relative_to_original(spec: LoraSpec, a, b, a0, b0):
  """The rank-``2r`` plain adapter ``(spec, [A, A0], [B; -B0])`` equal to ``s (A B - A0 B0)``.

  ``W_res + s A B = W + s (A B - A0 B0)``: on the original weight ``W`` it gives the trained
  model. The scale stays ``s``: ``alpha`` doubles (``alpha * sqrt(2)`` with rsLoRA), as PEFT's
  ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` writes it.
  """
  alpha = spec.alpha * (math.sqrt(2.0) if spec.rslora else 2.0)
  plain = dataclasses.replace(spec, rank=2 * spec.rank, alpha=alpha, init="gaussian")
  a2 = jnp.concatenate([jnp.asarray(a, jnp.float32), jnp.asarray(a0, jnp.float32)], axis=-1)
  axis = spec.stacked  # the rank axis of lora_b
  b2 = jnp.concatenate([jnp.asarray(b, jnp.float32), -jnp.asarray(b0, jnp.float32)], axis=axis)
  return plain, a2, b2
