"""Padding-free batches: several tokenised sequences share a row of ``max_seq_length`` tokens.

A batch of ``size`` sequences is split into ``groups`` consecutive groups (one per data-parallel
shard); each group's sequences are packed into rows by first-fit decreasing length, and every
group gets the same number of rows, rounded up to one of a few counts (``row_buckets``) so a
run compiles a handful of shapes. ``segment_ids`` number the sequences of a row ``1, 2, ...``
(``0``: padding) and ``cls_index`` points at each sequence's first token; the model
(:class:`lora_jax.models.Bert`) masks attention to each sequence and restarts its positions,
so a packed sequence gets the same logits as a padded one. What this saves: SST-2's sentences
average 13 tokens, while a batch of 32 padded to its longest row averages 40 per sentence.

Example:
  >>> lengths = np.array([5, 3, 4, 2])
  >>> first_fit_decreasing(lengths, 8)
  [[0, 1], [2, 3]]
"""

from __future__ import annotations

import numpy as np


def first_fit_decreasing(lengths: np.ndarray, row_len: int) -> list[list[int]]:
  """Indices of ``lengths`` grouped into rows of at most ``row_len`` tokens, longest first."""
  rows: list[list[int]] = []
  free: list[int] = []
  for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
    n = int(lengths[i])
    r = next((r for r, f in enumerate(free) if f >= n), None)
    if r is None:
      rows.append([i])
      free.append(row_len - n)
    else:
      rows[r].append(i)
      free[r] -= n
  return rows


def packed_batch(
  input_ids: np.ndarray,
  token_type_ids: np.ndarray,
  lengths: np.ndarray,
  labels: np.ndarray,
  take: np.ndarray,
  size: int,
  groups: int,
  pad_id: int,
  row_buckets: tuple[int, ...],
) -> dict:
  """Sequences ``take`` (row indices into the arrays), plus zero-weight fillers up to ``size``.

  Args:
    input_ids, token_type_ids: ``[N, max_seq_length]`` tokenised rows (padding after
      ``lengths``).
    lengths: ``[N]`` tokens per row.
    labels: ``[N]``.
    take: the batch's rows, at most ``size``.
    size: sequences per batch; a multiple of ``groups``.
    groups: data-parallel shards; group ``g`` holds sequences ``g*size/groups ...`` and rows
      ``g*R ...``.
    pad_id: the tokenizer's padding id.
    row_buckets: the row counts a group may have, ascending, the last ``>= size / groups``
      (e.g. :func:`train.data.batching.bucket_lengths` of ``size / groups`` from 1).

  Returns:
    numpy ``input_ids``, ``token_type_ids``, ``segment_ids``, ``attention_mask`` (int32
    ``[groups * R, max_seq_length]``), ``cls_index`` (int32 ``[groups, size / groups]``),
    ``labels`` and ``weights`` (``[size]``; 0 for fillers).
  """
  if size % groups:
    raise ValueError(f"batch size {size} is not a multiple of {groups} groups")
  take = np.asarray(take)
  per_group, row_len = size // groups, input_ids.shape[1]
  plans = []
  for g in range(groups):
    mine = take[g * per_group : (g + 1) * per_group]
    plans.append((mine, first_fit_decreasing(lengths[mine], row_len)))
  need = max(1, max(len(rows) for _, rows in plans))
  rows_per_group = next(b for b in row_buckets if b >= need)
  n_rows = groups * rows_per_group
  ids = np.full((n_rows, row_len), pad_id, np.int32)
  types = np.zeros((n_rows, row_len), np.int32)
  segments = np.zeros((n_rows, row_len), np.int32)
  cls_index = np.zeros((groups, per_group), np.int32)
  for g, (mine, rows) in enumerate(plans):
    for r, members in enumerate(rows):
      row, offset = g * rows_per_group + r, 0
      for k, j in enumerate(members):
        src, n = mine[j], int(lengths[mine[j]])
        ids[row, offset : offset + n] = input_ids[src, :n]
        types[row, offset : offset + n] = token_type_ids[src, :n]
        segments[row, offset : offset + n] = k + 1
        cls_index[g, j] = r * row_len + offset
        offset += n
  fill = size - len(take)
  chosen = np.concatenate([take, np.zeros(fill, take.dtype)]) if fill else take
  weights = np.ones(size, np.float32)
  weights[len(take) :] = 0.0
  return {
    "input_ids": ids,
    "token_type_ids": types,
    "segment_ids": segments,
    "attention_mask": (segments > 0).astype(np.int32),
    "cls_index": cls_index,
    "labels": labels[chosen],
    "weights": weights,
  }
