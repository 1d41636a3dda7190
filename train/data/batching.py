"""Batch shapes and data order every task shares: bucketed lengths and seeded epochs.

* Padded batches take the smallest of a few bucket lengths (:func:`bucket_lengths`: powers of
  two and their midpoints up to ``max_seq_length``): a run compiles a handful of shapes, not one
  per batch.
* :func:`epoch_batches` is a deterministic stream: micro-batch ``m`` is a function of ``seed``
  and ``m`` alone (each epoch a fresh permutation from ``(seed, epoch)``, :func:`epoch_order`;
  the last partial batch of an epoch is dropped), so a resumed run continues with exactly the
  batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def bucket_lengths(max_seq_length: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from ``smallest`` and the midpoints between them (x1.5), then the maximum.

  At most 1.5x padding over a batch's longest row, from about two shapes per doubling.

  Packed batches use the same steps for their row counts, from 1.

  Example:
    >>> bucket_lengths(128), bucket_lengths(100), bucket_lengths(8)
    ((16, 24, 32, 48, 64, 96, 128), (16, 24, 32, 48, 64, 96, 100), (8,))
    >>> bucket_lengths(32, smallest=1)
    (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
  """
  out, n = [], smallest
  while n < max_seq_length:
    out += [m for m in (n, n + n // 2) if m < max_seq_length]
    n *= 2
  return (*dict.fromkeys(out), max_seq_length)  # from 1, the first midpoint repeats 1


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket that holds ``length`` tokens."""
  return next((b for b in buckets if b >= length), buckets[-1])


def batches_per_epoch(n: int, batch_size: int) -> int:
  return n // batch_size


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The row order of one epoch: a permutation that depends on ``(seed, epoch)`` only."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(n: int, batch_size: int, seed: int, start: int = 0) -> Iterator[np.ndarray]:
  """The row indices of micro-batches ``start, start + 1, ...`` of the endless stream over ``n``
  rows (each epoch :func:`epoch_order`'s permutation; a partial last batch is left out).

  Example:
    >>> stream = epoch_batches(5, 2, seed=0)
    >>> first = [next(stream) for _ in range(4)]  # two batches per epoch
    >>> again = epoch_batches(5, 2, seed=0, start=3)
    >>> bool((next(again) == first[3]).all())
    True
  """
  per_epoch = batches_per_epoch(n, batch_size)
  if per_epoch == 0:
    raise ValueError(f"{n} rows are fewer than one batch of {batch_size}")
  m, epoch, order = start, -1, None
  while True:
    e, i = divmod(m, per_epoch)
    if e != epoch:
      epoch, order = e, epoch_order(n, seed, e)
    yield order[i * batch_size : (i + 1) * batch_size]
    m += 1
