"""Causal-LM data: files or Hub datasets, plain text or conversations, loss masks, packing.

* **Sources**: ``datasets.load_dataset(dataset_name, dataset_config_name)`` (the Hub), or local
  ``--train_file`` / ``--validation_file`` (JSON, JSONL, CSV, parquet, plain text). Without a
  validation split, ``validation_split_percentage`` of the training rows are held out.
* **Columns**: a text column (language modelling: every token is a target) or a conversation
  column (lists of ``{"role", "content"}`` turns, formatted with the tokenizer's chat template;
  with ``completion_only`` only the assistant replies, end-of-turn tokens included, are
  targets). Which one is picked from the columns present when no flag names it.
* **Sequences** (:class:`Sequences`): token ids and a per-token loss weight (``1``: this token
  is predicted and counts), truncated to ``max_seq_length`` (counted, never dropped silently).
* **Bad input** is refused in one line before training: an empty, blank, header-only or
  unparsable file (:func:`train.data.files.check_has_rows`), rows that are not text or not
  conversations, a split whose texts are all empty or whose examples keep no target token, a
  ``max_seq_length`` below 2 (:func:`check_max_seq_length`).
* **Batches**: packed (padding-free, as TRL's ``packing``): the sequences are placed once into
  rows of ``max_seq_length`` tokens by first-fit decreasing length, ``segment_ids`` numbering
  each row's sequences, and each epoch shuffles the rows; or padded: one sequence per row,
  each batch padded to a bucketed length. Either way a batch holds ``input_ids``,
  ``attention_mask``, ``segment_ids`` and ``weights`` (``[rows, length]``), and the targets
  listed per row (:func:`targets`).
* **Several adapters** (``--adapter_column``, :func:`adapter_ids`): each sequence names the
  adapter it trains; a packed row holds one adapter's sequences only, and batches carry
  ``adapter_ids`` (``[rows]``, ``-1`` for an empty filler row).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from train.data import files
from train.data import packing
from train.data.batching import bucket_for
from train.data.batching import bucket_lengths
from train.data.batching import epoch_batches

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
TEXT, MESSAGES = "text", "messages"  # the default column names of the two kinds of data
ROLES = ("system", "user", "assistant")
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# ---------------------------------------------------------------------------------------------
# Loading.


def _load_file(path: str, split: str):
  return files.load_file(path, split, BUILDERS, {".csv": {"keep_default_na": False}})


def load_raw(
  *,
  dataset_name: str | None = None,
  dataset_config_name: str | None = None,
  train_file: str | None = None,
  validation_file: str | None = None,
  validation_split_percentage: int = 5,
  seed: int = 0,
) -> dict[str, Any]:
  """``{"train": ..., "validation": ...}`` datasets (``validation`` may be held out of train).

  Raises:
    ValueError: neither a dataset nor a training file, an unsupported or empty file, or an
      empty split.
  """
  import datasets

  if dataset_name and train_file:
    raise ValueError(
      f"--dataset_name {dataset_name!r} and --train_file {train_file!r}: give one data source"
    )
  if dataset_name:
    try:  # datasets >= 4 runs no dataset script (no remote code): it refuses them
      raw = dict(datasets.load_dataset(dataset_name, dataset_config_name))
    except RuntimeError as e:
      if "Dataset scripts are no longer supported" not in str(e):
        raise
      raise ValueError(
        f"--dataset_name {dataset_name!r} is a dataset script ({e}); scripts are never run: "
        "give its data files (--train_file) or a dataset of data files"
      ) from None
  elif train_file:
    raw = {"train": _load_file(train_file, "train")}
    if validation_file:
      raw["validation"] = _load_file(validation_file, "validation")
  else:
    raise ValueError("no data: give --dataset_name (a Hub dataset) or --train_file")
  if "train" not in raw:
    raise ValueError(f"the dataset has no 'train' split; its splits: {sorted(raw)}")
  if "validation" not in raw and validation_split_percentage:
    held = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
    raw = {"train": held["train"], "validation": held["test"]}
  for split, ds in raw.items():
    if len(ds) == 0:
      raise ValueError(f"the {split} split is empty (0 rows)")
  return raw


def pick_column(
  columns: Sequence[str], text_column: str | None, messages_column: str | None, source: str
) -> tuple[str, str]:
  """``(kind, column)``: ``("messages", name)`` for conversations, ``("text", name)`` for text.

  A flag names the column; without one, ``messages`` is used if present, else ``text``.

  Example:
    >>> pick_column(["messages", "id"], None, None, "train.jsonl")
    ('messages', 'messages')
    >>> pick_column(["body"], "body", None, "train.jsonl")
    ('text', 'body')
  """
  if text_column and messages_column:
    raise ValueError("--text_column and --messages_column: give one (text or conversations)")
  for kind, name in ((MESSAGES, messages_column), (TEXT, text_column)):
    if name:
      if name not in columns:
        flag = "--messages_column" if kind == MESSAGES else "--text_column"
        raise ValueError(f"{flag} {name!r} is not a column of {source}; its columns: {columns}")
      return kind, name
  for kind in (MESSAGES, TEXT):
    if kind in columns:
      return kind, kind
  raise ValueError(
    f"{source} has neither a {MESSAGES!r} nor a {TEXT!r} column (its columns: {list(columns)}); "
    "name one with --messages_column (conversations) or --text_column (plain text)"
  )


# ---------------------------------------------------------------------------------------------
# Tokenising.


@dataclasses.dataclass
class Sequences:
  """Tokenised examples: ``ids[i]`` and ``weights[i]`` (1.0 where token ``t`` is a target)."""

  ids: list[np.ndarray]
  weights: list[np.ndarray]
  truncated: int = 0  # examples cut to max_seq_length
  without_targets: int = 0  # examples left with no target token
  adapters: np.ndarray | None = None  # each example's adapter (an index), or None: one adapter
  kept: np.ndarray | None = None  # the source rows these examples are, where some were skipped

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.array([len(x) for x in self.ids])


MIN_SEQ_LENGTH = 2  # one token to read, one to predict


def check_max_seq_length(max_len: int) -> None:
  """A causal LM learns from a token and the next one: ``max_seq_length`` must be at least 2."""
  if max_len < MIN_SEQ_LENGTH:
    raise ValueError(
      f"--max_seq_length {max_len} is too small: a causal LM needs at least {MIN_SEQ_LENGTH} "
      "tokens (one to read, one to predict)"
    )


def _finish(ids, weights, max_len: int, source: str, kept=None) -> Sequences:
  """Truncated to ``max_len``, counting what was cut; refused when no example is left with a
  target token (the loss would be 0/0: nothing learnt, a meaningless eval loss)."""
  truncated = sum(len(x) > max_len for x in ids)
  ids = [np.asarray(x[:max_len], np.int32) for x in ids]
  weights = [np.asarray(w[:max_len], np.float32) for w in weights]
  without = sum(not w[1:].any() for w in weights)
  if ids and without == len(ids):
    raise ValueError(
      f"{source}: none of its {len(ids)} examples has a target token within "
      f"max_seq_length={max_len} tokens ({truncated} truncated): raise --max_seq_length, or "
      "check the data (with completion-only loss, the assistant replies are the targets)"
    )
  if truncated:
    logger.warning(
      "%s: %d of %d examples are longer than max_seq_length=%d tokens and were truncated",
      source,
      truncated,
      len(ids),
      max_len,
    )
  if without:
    logger.warning(
      "%s: %d of %d examples have no target token left (nothing to learn from them)",
      source,
      without,
      len(ids),
    )
  return Sequences(ids, weights, truncated, without, kept=kept)


def _check_texts(texts: Sequence, source: str) -> None:
  """Every row a string; not every one empty (a few empty ones are counted in a warning)."""
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"{source}: row {i} holds {type(text).__name__}, not text")
  blank = sum(not text.strip() for text in texts)
  if blank and blank == len(texts):
    raise ValueError(f"{source}: all of its {blank} rows have an empty text")
  if blank:
    logger.warning("%s: %d of %d rows have an empty text", source, blank, len(texts))


def encode_text(texts: Sequence[str], tokenizer, max_len: int, source: str) -> Sequences:
  """Each text's tokens and the end-of-sequence token; every token a target."""
  _check_texts(texts, source)
  eos = tokenizer.eos_token_id
  ids = []
  for text in texts:
    tokens = tokenizer(text, add_special_tokens=True)["input_ids"]
    ids.append(tokens + ([eos] if eos is not None and (not tokens or tokens[-1] != eos) else []))
  return _finish(ids, [np.ones(len(x), np.float32) for x in ids], max_len, source)


def _check_turns(messages, i: int, source: str) -> None:
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{source}: row {i} is not a non-empty list of turns: {messages!r:.120}")
  for turn in messages:
    if (
      not isinstance(turn, Mapping)
      or turn.get("role") not in ROLES
      or not isinstance(turn.get("content"), str)
    ):
      raise ValueError(
        f"{source}: row {i} has a turn {turn!r:.120}; each turn needs a role in {list(ROLES)} "
        "and a text content"
      )


def render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
  """Token ids of ``messages`` through the tokenizer's chat template."""
  out = tokenizer.apply_chat_template(
    list(messages), tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
  )
  return list(out["input_ids"])


def encode_conversations(
  conversations: Sequence, tokenizer, max_len: int, completion_only: bool, source: str
) -> Sequences:
  """Chat-templated conversations; with ``completion_only`` only assistant replies are targets.

  A reply's tokens are found by rendering the conversation up to the reply's turn with the
  generation prompt (what a model sees before answering) and up to the end of the reply: the
  tokens between the two, end-of-turn included, are the reply's. This holds for any template
  whose renderings extend each other, which is checked.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise ValueError(
      f"{source} holds conversations, but the tokenizer {tokenizer.name_or_path!r} has no chat "
      "template; use a tokenizer with one (--tokenizer_name), or a text column (--text_column)"
    )
  ids, weights, skipped = [], [], []
  for i, messages in enumerate(conversations):
    _check_turns(messages, i, source)
    if completion_only and messages[0]["role"] == "assistant":
      skipped.append(i)  # a reply with no turn before it: nothing it answers, no prompt to render
      continue
    full = _render_row(tokenizer, messages, False, i, source)
    weight = np.zeros(len(full), np.float32) if completion_only else np.ones(len(full), np.float32)
    for t, turn in enumerate(messages):
      if not completion_only or turn["role"] != "assistant":
        continue
      before = _render_row(tokenizer, messages[:t], True, i, source)
      upto = _render_row(tokenizer, messages[: t + 1], False, i, source)
      if full[: len(before)] != before or full[: len(upto)] != upto:
        raise ValueError(
          f"{source}: row {i}: the chat template does not render a conversation as an "
          "extension of its beginning, so the assistant's tokens cannot be told apart; train on "
          "every token with --no-completion_only_loss"
        )
      weight[len(before) : len(upto)] = 1.0
    ids.append(full)
    weights.append(weight)
  if skipped:
    rows = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
    if len(skipped) == len(conversations):
      raise ValueError(
        f"{source}: all of its {len(skipped)} conversations open with an assistant turn, which "
        "completion-only loss cannot use (a reply needs the turn it answers before it): start "
        "them with a user turn, or train on every token with --no-completion_only_loss"
      )
    logger.warning(
      "%s: skipped %d of %d conversations that open with an assistant turn (rows %s, from 0): "
      "completion-only loss needs the turn a reply answers before it",
      source, len(skipped), len(conversations), rows,
    )  # fmt: skip
  kept = np.setdiff1d(np.arange(len(conversations)), skipped) if skipped else None
  return _finish(ids, weights, max_len, source, kept)


def _render_row(tokenizer, messages, add_generation_prompt: bool, i: int, source: str):
  """:func:`render`, a refusal of the template (its ``raise_exception``, a sandbox violation)
  turned into one line naming the row."""
  import jinja2

  try:
    return render(tokenizer, messages, add_generation_prompt)
  except jinja2.TemplateError as e:
    raise ValueError(
      f"{source}: row {i}: the chat template refused it ({type(e).__name__}: {e})"
    ) from None


def encode(dataset, kind: str, column: str, tokenizer, max_len: int, completion_only: bool,
           source: str) -> Sequences:  # fmt: skip
  """``dataset[column]`` tokenised (:func:`encode_conversations` or :func:`encode_text`).

  Raises:
    ValueError: ``max_len`` below :data:`MIN_SEQ_LENGTH`, rows of the wrong kind, no target.
  """
  check_max_seq_length(max_len)
  values = dataset[column]
  if kind == MESSAGES:
    return encode_conversations(values, tokenizer, max_len, completion_only, source)
  return encode_text(values, tokenizer, max_len, source)


# ---------------------------------------------------------------------------------------------
# Batches.


def adapter_ids(values: Sequence, names: Sequence[str] | None, column: str, source: str):
  """``(names, ids)``: each row's adapter as an index into ``names`` (``int32``).

  ``names=None`` (the training split): the distinct values, sorted. Otherwise a value outside
  ``names`` is refused in one line. Names become folder names (``OUTPUT_DIR/adapter/NAME``): a
  value that is not a non-empty string of letters, digits, ``_``, ``-`` and ``.`` is refused.

  Example:
    >>> names, ids = adapter_ids(["fr", "de", "fr"], None, "task", "t.jsonl")
    >>> names, ids.tolist()
    (('de', 'fr'), [1, 0, 1])
    >>> adapter_ids(["it"], names, "task", "v.jsonl")
    Traceback (most recent call last):
    ...
    ValueError: v.jsonl: row 0 names the adapter 'it' in column 'task'; the training split's ...
  """
  for i, v in enumerate(values):
    if not isinstance(v, str) or not ADAPTER_NAME.fullmatch(v) or v in (".", ".."):
      raise ValueError(
        f"{source}: row {i} names the adapter {v!r} in column {column!r}: an adapter name is a "
        "non-empty string of letters, digits, '_', '-' and '.' (it names a folder)"
      )
  if names is None:
    names = tuple(sorted(set(values)))
  index = {n: i for i, n in enumerate(names)}
  for i, v in enumerate(values):
    if v not in index:
      raise ValueError(
        f"{source}: row {i} names the adapter {v!r} in column {column!r}; the training "
        f"split's adapters: {', '.join(names)}"
      )
  return tuple(names), np.array([index[v] for v in values], np.int32)


def pack(seqs: Sequences, row_len: int) -> list[list[int]]:
  """The sequences placed into rows of ``row_len`` tokens (first-fit decreasing length); with
  ``seqs.adapters``, each adapter's sequences apart (a row trains one adapter)."""
  if seqs.adapters is None:
    return packing.first_fit_decreasing(seqs.lengths, row_len)
  rows = []
  for a in np.unique(seqs.adapters):
    members = np.flatnonzero(seqs.adapters == a)
    rows += [
      members[r].tolist() for r in packing.first_fit_decreasing(seqs.lengths[members], row_len)
    ]
  return rows


def _rows_batch(seqs: Sequences, rows: Sequence[Sequence[int]], n_rows: int, length: int,
                pad_id: int) -> dict:  # fmt: skip
  """``n_rows`` rows of ``length`` tokens holding ``rows`` (lists of sequence indices); rows
  beyond ``len(rows)`` are empty fillers (weight 0)."""
  ids = np.full((n_rows, length), pad_id, np.int32)
  segments = np.zeros((n_rows, length), np.int32)
  weights = np.zeros((n_rows, length), np.float32)
  for r, members in enumerate(rows):
    at = 0
    for s, i in enumerate(members, start=1):
      n = len(seqs.ids[i])
      ids[r, at : at + n], segments[r, at : at + n] = seqs.ids[i], s
      weights[r, at : at + n] = seqs.weights[i]
      at += n
  batch = {
    "input_ids": ids,
    "attention_mask": (segments > 0).astype(np.int32),
    "segment_ids": segments,
    "weights": weights,
  }
  if seqs.adapters is not None:
    batch["adapter_ids"] = np.full(n_rows, -1, np.int32)
    batch["adapter_ids"][: len(rows)] = [seqs.adapters[m[0]] for m in rows]
  return batch | targets(ids, segments, weights)


def targets(ids: np.ndarray, segments: np.ndarray, weights: np.ndarray) -> dict:
  """The batch's next-token targets, listed per row so the model computes logits there only.

  Position ``p`` of a row predicts token ``p + 1`` when both belong to one sequence and that
  token's weight is non-zero (packed neighbours never predict each other). Each row lists its
  ``target_positions``, ``target_ids`` (the tokens at ``p + 1``) and ``target_weights``
  (``[rows, k]``, padded with weight 0 to ``k``, a bucket of the longest row's count: few
  shapes). With completion-only loss most tokens are not targets: the output projection and the
  softmax over the vocabulary then run on a fraction of the tokens.

  Example:
    >>> t = targets(np.array([[5, 6, 7, 8]]), np.array([[1, 1, 2, 2]]),
    ...             np.array([[0, 1, 1, 1]], np.float32))
    >>> [a.tolist() for a in t.values()]  # positions, ids, weights; 1 precedes another sequence
    [[[0, 2, 0]], [[6, 8, 0]], [[1.0, 1.0, 0.0]]]
  """
  same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
  w = weights[:, 1:] * same
  counts = (w > 0).sum(axis=1)
  length = ids.shape[1]
  k = bucket_for(max(int(counts.max(initial=0)), 1), bucket_lengths(max(length - 1, 1), 8))
  positions = np.zeros((len(ids), k), np.int32)
  labels = np.zeros((len(ids), k), np.int32)
  target_weights = np.zeros((len(ids), k), np.float32)
  for r in range(len(ids)):
    p = np.flatnonzero(w[r])
    positions[r, : len(p)], labels[r, : len(p)] = p, ids[r, p + 1]
    target_weights[r, : len(p)] = w[r, p]
  return {"target_positions": positions, "target_ids": labels, "target_weights": target_weights}


@dataclasses.dataclass
class Batcher:
  """Training and evaluation batches of one split, packed or padded (see the module doc).

  ``rows`` counts what a batch is made of: packed rows, or sequences when padded.
  """

  seqs: Sequences
  max_seq_length: int
  packed: bool
  pad_id: int

  def __post_init__(self):
    self.units = pack(self.seqs, self.max_seq_length) if self.packed else None
    self.buckets = bucket_lengths(self.max_seq_length)

  @property
  def rows(self) -> int:
    return len(self.units) if self.packed else len(self.seqs)

  def batch(self, units: np.ndarray, n_rows: int) -> dict:
    if self.packed:
      members = [self.units[u] for u in units]
      return _rows_batch(self.seqs, members, n_rows, self.max_seq_length, self.pad_id)
    longest = max((len(self.seqs.ids[u]) for u in units), default=1)
    length = bucket_for(longest, self.buckets)
    return _rows_batch(self.seqs, [[u] for u in units], n_rows, length, self.pad_id)

  def train_batches(self, n_rows: int, seed: int, start: int = 0) -> Iterator[dict]:
    """Micro-batches ``start, start + 1, ...`` of the endless, seeded stream (each epoch a
    permutation of the rows; a partial last batch of an epoch is left out)."""
    per_epoch = self.rows // n_rows
    if per_epoch == 0:
      raise ValueError(
        f"the training set makes {self.rows} rows, fewer than one global batch of {n_rows} "
        "(lower --per_device_train_batch_size, or add data)"
      )
    for units in epoch_batches(self.rows, n_rows, seed, start):
      yield self.batch(units, n_rows)

  def eval_batches(self, n_rows: int) -> Iterator[dict]:
    """Every row once, in order; the last batch filled with empty rows."""
    order = np.arange(self.rows)
    if not self.packed:  # shortest first: less padding
      order = np.argsort(self.seqs.lengths, kind="stable")
    for i in range(0, len(order), n_rows):
      yield self.batch(order[i : i + n_rows], n_rows)
