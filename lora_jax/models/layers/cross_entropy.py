"""Next-token cross-entropy straight from hidden states, the logits formed a chunk at a time.

A causal LM's loss multiplies every position's hidden state by the ``[hidden, vocab]`` output
kernel and takes a softmax over the vocabulary: for a batch of ``T`` tokens that is a float32
``[T, vocab]`` array, and autodiff keeps it (or its softmax) for the backward pass and forms a
second one for the gradient (three ``[2048, 32000]`` float32 buffers, 750 MiB, for one Llama-2
sequence). :func:`fused_cross_entropy` never holds more than ``chunk_size`` rows of logits:

* the forward pass walks the tokens in chunks; for each it forms the logits, the loss and
  ``v = (softmax - onehot) @ kernel^T``, the gradient of each token's loss with respect to its
  hidden state, and keeps only ``v`` (``[T, hidden]``) for the backward pass;
* the backward pass scales ``v`` by each token's cotangent: the logits are not recomputed, so
  the step does the FLOPs of the plain computation (one matmul forward, one backward);
* a gradient for the kernel (a trained or tied-and-trained output layer) is formed only when
  the kernel is differentiated, recomputing each chunk's softmax in the backward pass.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
  >>> w = jax.random.normal(jax.random.key(1), (8, 11))
  >>> t = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
  >>> nll = fused_cross_entropy(h, w, t, chunk_size=4)
  >>> ref = optax.softmax_cross_entropy_with_integer_labels(h @ w, t)
  >>> bool(jnp.allclose(nll, ref, rtol=1e-5, atol=1e-5))
  True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

VOCAB_AXES = (0, 1)


def _logits(h, kernel, vocab_axis: int):
  """float32 ``[rows, vocab]`` logits of ``h`` ``[rows, hidden]``."""
  contract = 0 if vocab_axis == 1 else 1
  return jax.lax.dot_general(
    h, kernel, (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32
  )


def _nll(logits, targets):
  """``(-log softmax(logits)[target], exp(logits - max), its row sums)`` of float32 ``logits``
  ``[rows, vocab]``: the losses ``[rows]``, and what the softmax is formed from."""
  peak = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - peak)
  total = jnp.sum(e, axis=-1, keepdims=True)
  picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)
  return (jnp.log(total) + peak - picked)[:, 0], e, total


def _softmax_minus_onehot(logits, targets):
  """``(nll, softmax - onehot)`` of float32 ``logits`` ``[rows, vocab]``."""
  nll, e, total = _nll(logits, targets)
  onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype)[None, :] == targets[:, None]
  return nll, e / total - onehot.astype(jnp.float32)


def _chunks(x, chunk: int):
  """``x`` ``[rows, ...]`` as ``[n, chunk, ...]``, zero rows appended to fill the last chunk."""
  pad = -x.shape[0] % chunk
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(-1, chunk, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _rows_nll(h, kernel, targets, vocab_axis: int, chunk: int):
  return _forward(h, kernel, targets, vocab_axis, chunk, grad=False)[0]


def _forward(h, kernel, targets, vocab_axis: int, chunk: int, grad: bool = True):
  """``(nll [rows], dnll/dh [rows, hidden] float32 or None)``, ``chunk`` rows of logits at a
  time; ``grad=False`` (no differentiation, e.g. an evaluation) forms the losses only."""
  rows = h.shape[0]

  def one(args):
    hc, tc = args
    logits = _logits(hc, kernel, vocab_axis)
    if not grad:
      return _nll(logits, tc)[0]
    nll, g = _softmax_minus_onehot(logits, tc)
    # dL/dh = (softmax - onehot) @ kernel^T: the contraction runs over the vocabulary axis.
    dh = jax.lax.dot_general(
      g.astype(kernel.dtype), kernel, (((1,), (vocab_axis,)), ((), ())),
      preferred_element_type=jnp.float32,
    )  # fmt: skip
    return nll, dh

  out = jax.lax.map(one, (_chunks(h, chunk), _chunks(targets, chunk)))
  if not grad:
    return out.reshape(-1)[:rows], None
  nll, dh = out
  return nll.reshape(-1)[:rows], dh.reshape(-1, h.shape[1])[:rows]


def _fwd(h, kernel, targets, vocab_axis, chunk):
  nll, dh = _forward(h.value, kernel.value, targets.value, vocab_axis, chunk)
  # The kernel's gradient needs the inputs again; keep them only if it is differentiated.
  saved = (h.value, kernel.value, targets.value) if kernel.perturbed else None
  return nll, (dh, jnp.zeros((0,), h.value.dtype), saved)  # an empty array carries the dtype


def _bwd(vocab_axis, chunk, res, g):
  dh, h_like, saved = res
  if isinstance(g, SymbolicZero):
    return None, None, None
  d_h = (g[:, None] * dh).astype(h_like.dtype)
  if saved is None:
    return d_h, None, None
  h, kernel, targets = saved

  def one(acc, args):
    hc, tc, gc = args
    _, p = _softmax_minus_onehot(_logits(hc, kernel, vocab_axis), tc)
    p = (p * gc[:, None]).astype(kernel.dtype)
    # dL/dkernel = h^T @ (g * (softmax - onehot)), laid out as the kernel.
    a, b = (hc, p) if vocab_axis == 1 else (p, hc)
    dk = jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc + dk, None

  acc = jnp.zeros(kernel.shape, jnp.float32)
  acc, _ = jax.lax.scan(one, acc, (_chunks(h, chunk), _chunks(targets, chunk), _chunks(g, chunk)))
  return d_h, acc.astype(kernel.dtype), None


_rows_nll.defvjp(_fwd, _bwd, symbolic_zeros=True)


def fused_cross_entropy(
  hidden: jax.Array,
  kernel: jax.Array,
  target_ids: jax.Array,
  *,
  vocab_axis: int = 1,
  chunk_size: int = 256,
  dtype=None,
) -> jax.Array:
  """Each position's cross-entropy ``-log softmax(hidden @ kernel)[target]``, float32.

  Equal to ``optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, target_ids)``
  (the matmul in ``dtype``, accumulated and normalised in float32), without the full logits:
  see the module docstring. Weighting, masking and averaging are the caller's.

  Args:
    hidden: ``[..., hidden]`` final hidden states.
    kernel: the output layer: ``[hidden, vocab]`` (a Dense kernel, ``vocab_axis=1``) or
      ``[vocab, hidden]`` (a tied embedding table, ``vocab_axis=0``).
    target_ids: ``[...]`` integer token each position should predict, in ``[0, vocab)``.
    vocab_axis: which axis of ``kernel`` is the vocabulary.
    chunk_size: positions whose logits exist at once.
    dtype: the matmuls' operand dtype (default: ``hidden``'s and ``kernel``'s promoted dtype).

  Returns:
    float32 ``[...]``, the shape of ``target_ids``.
  """
  if vocab_axis not in VOCAB_AXES:
    raise ValueError(f"vocab_axis={vocab_axis!r}; valid: {VOCAB_AXES}")
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size!r}; valid: a positive integer")
  hidden, kernel, target_ids = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(target_ids)
  width = kernel.shape[1 - vocab_axis]
  if kernel.ndim != 2 or hidden.shape[-1] != width or hidden.shape[:-1] != target_ids.shape:
    raise ValueError(
      f"shapes do not fit: hidden {hidden.shape}, kernel {kernel.shape} (vocab_axis="
      f"{vocab_axis}), target_ids {target_ids.shape}; expected hidden [..., {width}] and "
      f"target_ids [...] with hidden's leading axes"
    )
  if not jnp.issubdtype(target_ids.dtype, jnp.integer):
    raise ValueError(f"target_ids has dtype {target_ids.dtype}; valid: an integer dtype")
  dtype = dtype or jnp.promote_types(hidden.dtype, kernel.dtype)
  rows = hidden.reshape(-1, width).astype(dtype)
  chunk = min(chunk_size, max(rows.shape[0], 1))
  nll = _rows_nll(rows, kernel.astype(dtype), target_ids.reshape(-1), vocab_axis, chunk)
  return nll.reshape(target_ids.shape)
