"""The random causal-LM batch of a benchmark configuration, the same on both sides (NumPy only).

``packed``: every row is filled with sequences of random lengths (``seq/8`` to ``seq/2``
tokens, the last one cut to fit), numbered ``1, 2, ...`` by ``segment_ids``; positions restart
at 0 with each sequence, attention stays inside it. No padding. ``padded``: one sequence of
``seq/2`` to ``seq`` tokens per row, then padding (``segment_ids`` 0, ``attention_mask`` 0).

The loss is the mean next-token cross-entropy over the targets that stay inside a sequence:
token ``t + 1`` is the target of position ``t`` where both belong to the same sequence
(``target_ids``, weighted by ``target_weights``; the last position has none). ``labels`` says
the same in transformers' convention (``-100``: ignored; the model shifts them).
"""

from __future__ import annotations

import numpy as np

IGNORE = -100  # transformers' ignore_index


def _lengths(rng: np.random.Generator, seq: int, kind: str) -> list[int]:
  if kind == "padded":
    return [int(rng.integers(max(seq // 2, 1), seq + 1))]
  lengths, left = [], seq
  while left > 0:
    n = min(int(rng.integers(max(seq // 8, 1), max(seq // 2, 1) + 1)), left)
    lengths.append(n)
    left -= n
  return lengths


def make_batch(seq: int, batch: int, vocab: int, kind: str, seed: int = 0) -> dict:
  """``input_ids``, ``segment_ids``, ``attention_mask``, ``positions``, ``target_ids``,
  ``target_weights`` (float32) and ``labels``, all NumPy ``[batch, seq]``.

  Example:
    >>> b = make_batch(16, 2, 100, "packed", seed=1)
    >>> b["segment_ids"][0].tolist()
    [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4]
    >>> b["positions"][0].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 0, 1, 2, 3, 0, 1]
    >>> b["target_weights"][0].tolist() == [*(b["labels"][0, 1:] >= 0), False]
    True
    >>> make_batch(16, 2, 100, "stacked")
    Traceback (most recent call last):
    ...
    ValueError: unknown batch kind 'stacked'; valid: packed, padded
  """
  if kind not in ("packed", "padded"):
    raise ValueError(f"unknown batch kind {kind!r}; valid: packed, padded")
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (batch, seq)).astype(np.int32)
  segments = np.zeros((batch, seq), np.int32)
  positions = np.zeros((batch, seq), np.int32)
  for row in range(batch):
    start = 0
    for k, n in enumerate(_lengths(rng, seq, kind)):
      segments[row, start : start + n] = k + 1
      positions[row, start : start + n] = np.arange(n)
      start += n
  ids[segments == 0] = 0
  inside = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
  labels = np.where(np.pad(inside, ((0, 0), (1, 0))), ids, IGNORE).astype(np.int64)
  after = ((0, 0), (0, 1))
  return {
    "input_ids": ids,
    "segment_ids": segments,
    "attention_mask": (segments > 0).astype(np.int32),
    "positions": positions,
    "target_ids": np.pad(ids[:, 1:], after),
    "target_weights": np.pad(inside, after).astype(np.float32),
    "labels": labels,
  }
