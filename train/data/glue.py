"""GLUE data: loading (Hub or local files), tokenising, bucketing and batching.

* :func:`load_raw` reads ``datasets.load_dataset("nyu-mll/glue", task)`` by default, or local
  TSV / CSV / JSON files (TSV is read with quoting disabled, as GLUE's files need).
* Bad input is refused before any training, in one line naming the split, its file and what
  is valid: an empty file, a file of a header only (:func:`train.data.files.check_has_rows`), a
  missing text or
  label column, labels outside ``0..num_labels-1`` (:func:`check_splits`; test splits need no
  labels), a ``max_seq_length`` too small for the tokenizer (:func:`check_max_seq_length`).
* :func:`tokenize` runs the checkpoint's tokenizer through ``Dataset.map(batched=True)`` with
  truncation and no padding; :func:`to_examples` turns the result into numpy arrays.
* Batches are padding-free (:mod:`train.data.packing`: sequences share rows of
  ``max_seq_length``) or padded to the smallest of a few bucket lengths
  (:func:`train.data.batching.bucket_lengths`); either way a run compiles a handful of shapes,
  not one per batch.
* :func:`train_batches` is the deterministic stream of :func:`train.data.batching.epoch_batches`:
  a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from collections.abc import Mapping

import numpy as np

from train.data import files
from train.data import packing
from train.data.batching import batches_per_epoch
from train.data.batching import bucket_for
from train.data.batching import bucket_lengths
from train.data.batching import epoch_batches

HUB_DATASET = "nyu-mll/glue"


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """What a GLUE task reads and predicts.

  Attributes:
    name: the GLUE config name (``"sst2"``).
    keys: the text column(s); the second is ``None`` for single-sentence tasks.
    num_labels: classes, or 1 for regression (STS-B).
    eval_splits: Hub validation split(s); the first is the main one (MNLI: matched, then
      mismatched).
    test_splits: Hub test split(s), in the same order.
  """

  name: str
  keys: tuple[str, str | None]
  num_labels: int
  eval_splits: tuple[str, ...] = ("validation",)
  test_splits: tuple[str, ...] = ("test",)

  @property
  def is_regression(self) -> bool:
    return self.num_labels == 1


TASKS: dict[str, GlueTask] = {
  t.name: t
  for t in (
    GlueTask("cola", ("sentence", None), 2),
    GlueTask("sst2", ("sentence", None), 2),
    GlueTask("mrpc", ("sentence1", "sentence2"), 2),
    GlueTask("qqp", ("question1", "question2"), 2),
    GlueTask("stsb", ("sentence1", "sentence2"), 1),
    GlueTask(
      "mnli",
      ("premise", "hypothesis"),
      3,
      ("validation_matched", "validation_mismatched"),
      ("test_matched", "test_mismatched"),
    ),
    GlueTask("qnli", ("question", "sentence"), 2),
    GlueTask("rte", ("sentence1", "sentence2"), 2),
    GlueTask("wnli", ("sentence1", "sentence2"), 2),
  )
}

_BUILDERS = {".tsv": "csv", ".csv": "csv", ".json": "json", ".jsonl": "json"}
_OPTIONS = {  # GLUE's TSVs hold bare quote characters: no CSV quoting.
  ".tsv": dict(delimiter="\t", quoting=3, keep_default_na=False),
  ".csv": dict(keep_default_na=False),
}


def _load_file(path: str, split: str):
  return files.load_file(path, split, _BUILDERS, _OPTIONS)


# ---------------------------------------------------------------------------------------------
# Loading.


def load_raw(
  task: GlueTask,
  *,
  train_file: str | None = None,
  validation_file: str | None = None,
  test_file: str | None = None,
):
  """The task's splits as a ``datasets.DatasetDict``.

  With no file given, the Hub's ``nyu-mll/glue`` config ``task.name``. With files, exactly the
  splits given, named ``train`` / ``validation`` / ``test``.

  Raises:
    ValueError: an unsupported, empty or unreadable file, or a split that fails
      :func:`check_splits` (columns, labels), in one line naming the split and its file.
    FileNotFoundError: a file that does not exist.
  """
  import datasets

  sources = {"train": train_file, "validation": validation_file, "test": test_file}
  if not any(sources.values()):
    raw = datasets.load_dataset(HUB_DATASET, task.name)
    check_splits(raw, task, {s: f"{HUB_DATASET} {task.name}" for s in raw})
    return raw
  raw = datasets.DatasetDict(
    {split: _load_file(path, split) for split, path in sources.items() if path}
  )
  check_splits(raw, task, sources)
  return raw


def is_test_split(split: str, task: GlueTask) -> bool:
  """Test splits need no labels (GLUE's have none, or ``-1``): they are only predicted."""
  return split == "test" or split in task.test_splits


def check_splits(raw: Mapping, task: GlueTask, sources: Mapping[str, str | None]) -> None:
  """Every split has the text column(s) of the first (``train``) split, and every split but a
  test split a ``label`` column of valid labels (:func:`check_split_labels`); the error names the
  split, its source (``sources[split]``: its file), what is missing and the columns it has.
  """
  if not raw:
    return
  first = "train" if "train" in raw else next(iter(raw))

  def where(split: str) -> str:
    return f"the {split} split ({sources.get(split)!r})"

  try:
    keys = text_keys(raw[first], task)
  except ValueError as e:
    raise ValueError(f"{where(first)}: {e}") from None
  for split, ds in raw.items():
    columns = list(ds.column_names)
    wanted = [k for k in keys if k] + ([] if is_test_split(split, task) else ["label"])
    missing = [c for c in wanted if c not in columns]
    if missing:
      raise ValueError(
        f"{where(split)} has no {'column' if len(missing) == 1 else 'columns'} "
        f"{', '.join(map(repr, missing))}; its columns: {columns} "
        f"(task {task.name} reads {wanted}{'' if split == first else f', as the {first} split'})"
      )
  names = label_names(raw[first], task)
  for split, ds in raw.items():
    if not is_test_split(split, task):
      check_split_labels(ds, task, where(split), names, first)


def check_split_labels(
  dataset, task: GlueTask, where: str, names: list[str] | None, first: str = "train"
) -> None:
  """The ``label`` column before tokenising: numbers for regression; class indices
  ``0..num_labels-1`` or names for classification (names: those of the ``first`` split, at most
  ``num_labels`` of them). ``where`` names the split and its file in the error.

  Example:
    >>> import datasets
    >>> check_split_labels(datasets.Dataset.from_dict({"label": [0, 1, 7]}), TASKS["sst2"],
    ...                    "the validation split ('dev.tsv')", None)
    Traceback (most recent call last):
    ValueError: the validation split ('dev.tsv') has label 7; valid: 0..1 (task sst2 has 2 classes)
  """
  feature = dataset.features["label"]
  dtype = getattr(feature, "dtype", "?")
  values = dataset.unique("label")
  if None in values:
    raise ValueError(f"{where} has rows without a label (null)")
  named = dtype in ("string", "large_string")
  if task.is_regression:
    if named or dtype == "bool":
      raise ValueError(f"{where} has labels {sorted(values)[:5]}; task {task.name} wants numbers")
    return
  valid = f"valid: 0..{task.num_labels - 1} (task {task.name} has {task.num_labels} classes)"
  if named:
    if any(not v.strip() for v in values):
      raise ValueError(f"{where} has rows with an empty label ('': a row short of a field?)")
    if names is None:
      raise ValueError(
        f"{where} has label names {sorted(values)[:5]} but the {first} split numeric labels; "
        "use one kind"
      )
    if len(names) > task.num_labels:
      raise ValueError(
        f"{where} has {len(names)} label names {names[:5]}; task {task.name} has "
        f"{task.num_labels} classes"
      )
    bad = sorted(set(values) - set(names))
    if bad:
      raise ValueError(f"{where} has labels {bad[:5]}, not among the {first} split's {names}")
    return
  if names is not None and not hasattr(feature, "names"):
    raise ValueError(
      f"{where} has numeric labels {sorted(values)[:5]} but the {first} split label names "
      f"{names[:5]}; use one kind"
    )
  bad = sorted(v for v in values if v not in range(task.num_labels))
  if bad:
    label = "label" if len(bad) == 1 else "labels"
    raise ValueError(f"{where} has {label} {', '.join(map(str, bad[:5]))}; {valid}")


def split_names(raw: Mapping, task: GlueTask, kind: str) -> list[str]:
  """The splits of ``raw`` that serve as ``kind`` (``"eval"`` or ``"test"``), main one first."""
  hub = task.eval_splits if kind == "eval" else task.test_splits
  local = "validation" if kind == "eval" else "test"
  names = [s for s in hub if s in raw]
  return names or ([local] if local in raw else [])


def text_keys(dataset, task: GlueTask) -> tuple[str, str | None]:
  """The task's text columns, or (as HF's run_glue.py) the first non-label columns."""
  columns = list(dataset.column_names)
  if task.keys[0] in columns and (task.keys[1] is None or task.keys[1] in columns):
    return task.keys
  others = [c for c in columns if c not in ("label", "idx")]
  if not others:
    raise ValueError(f"no text column in {columns} (task {task.name} wants {task.keys})")
  return (others[0], others[1] if len(others) > 1 and task.keys[1] else None)


def label_names(dataset, task: GlueTask) -> list[str] | None:
  """Class names when the labels are named (the Hub's ``ClassLabel`` or string labels)."""
  if task.is_regression or "label" not in dataset.column_names:
    return None
  feature = dataset.features["label"]
  if hasattr(feature, "names"):
    return list(feature.names)
  if dataset.features["label"].dtype in ("string", "large_string"):
    return sorted(set(dataset["label"]))
  return None


# ---------------------------------------------------------------------------------------------
# Tokenising and numpy examples.


def min_seq_length(tokenizer, pair: bool) -> int:
  """The shortest ``max_seq_length`` that keeps a token of each text besides the tokenizer's
  special tokens (``[CLS] a [SEP]``: 3; ``[CLS] a [SEP] b [SEP]``: 5)."""
  return tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)


def check_max_seq_length(tokenizer, keys: tuple[str, str | None], max_seq_length: int) -> None:
  """A ``max_seq_length`` below :func:`min_seq_length` is refused, naming the minimum (the
  tokenizer cannot truncate below its special tokens, or would leave a text out)."""
  pair = keys[1] is not None
  least = min_seq_length(tokenizer, pair)
  if max_seq_length < least:
    n = tokenizer.num_special_tokens_to_add(pair=pair)
    raise ValueError(
      f"--max_seq_length {max_seq_length} is too small: the tokenizer adds {n} special tokens "
      f"to each {'pair of texts' if pair else 'text'}, so the minimum is {least}"
    )


def tokenize(dataset, tokenizer, keys: tuple[str, str | None], max_seq_length: int):
  """``Dataset.map(batched=True)``: truncated token ids, no padding (that is per batch).

  Raises:
    ValueError: ``max_seq_length`` is below :func:`min_seq_length`.
  """
  check_max_seq_length(tokenizer, keys, max_seq_length)

  def encode(batch):
    texts = (batch[keys[0]],) if keys[1] is None else (batch[keys[0]], batch[keys[1]])
    enc = tokenizer(*texts, truncation=True, max_length=max_seq_length)
    out = {"input_ids": enc["input_ids"]}
    if "token_type_ids" in enc:
      out["token_type_ids"] = enc["token_type_ids"]
    return out

  drop = [c for c in dataset.column_names if c != "label"]
  return dataset.map(encode, batched=True, remove_columns=drop, desc="tokenizing")


@dataclasses.dataclass(frozen=True)
class Examples:
  """Tokenised rows, padded to ``max_seq_length`` once; batches slice them to a bucket."""

  input_ids: np.ndarray  # int32 [N, max_seq_length]
  token_type_ids: np.ndarray  # int32 [N, max_seq_length]
  lengths: np.ndarray  # int32 [N]
  labels: np.ndarray  # int32 (classes) or float32 (regression) [N]
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.lengths)


def to_examples(
  tokenized, max_seq_length: int, *, pad_id: int, regression: bool, names: list[str] | None
) -> Examples:
  """Numpy arrays from a tokenised dataset; string labels are mapped through ``names``."""
  ids = tokenized["input_ids"]
  types = tokenized["token_type_ids"] if "token_type_ids" in tokenized.column_names else None
  n = len(ids)
  input_ids = np.full((n, max_seq_length), pad_id, np.int32)
  token_type_ids = np.zeros((n, max_seq_length), np.int32)
  lengths = np.zeros(n, np.int32)
  for i, row in enumerate(ids):
    lengths[i] = len(row)
    input_ids[i, : len(row)] = row
    if types is not None:
      token_type_ids[i, : len(row)] = types[i]
  if "label" not in tokenized.column_names:
    labels = np.zeros(n, np.float32 if regression else np.int32)
  elif regression:
    labels = np.asarray(tokenized["label"], np.float32)
  else:
    raw = tokenized["label"]
    if raw and isinstance(raw[0], str):
      index = {name: i for i, name in enumerate(names or [])}
      bad = sorted({r for r in raw if r not in index})
      if bad:
        raise ValueError(f"labels {bad[:5]} are not among the training labels {names}")
      raw = [index[r] for r in raw]
    labels = np.asarray(raw, np.int32)
  return Examples(input_ids, token_type_ids, lengths, labels, pad_id)


def check_labels(examples: Examples, num_labels: int, source: str) -> None:
  """Training labels must be class indices ``0..num_labels-1``."""
  if num_labels == 1:
    return
  bad = sorted(set(np.unique(examples.labels).tolist()) - set(range(num_labels)))
  if bad:
    raise ValueError(
      f"{source} has labels {bad[:5]} outside 0..{num_labels - 1} (num_labels={num_labels})"
    )


# ---------------------------------------------------------------------------------------------
# Buckets and batches.


def make_batch(examples: Examples, rows: np.ndarray, buckets: tuple[int, ...], size: int) -> dict:
  """Rows ``rows`` padded to a bucket length, and with zero-weight rows up to ``size`` rows.

  Returns numpy arrays ``input_ids``, ``attention_mask``, ``token_type_ids`` (int32
  ``[size, L]``), ``labels`` and ``weights`` (float32 ``[size]``; 0 for filler rows).
  """
  rows = np.asarray(rows)
  width = bucket_for(int(examples.lengths[rows].max(initial=1)), buckets)
  fill = size - len(rows)
  take = np.concatenate([rows, np.zeros(fill, rows.dtype)]) if fill else rows
  ids = examples.input_ids[take, :width]
  mask = (np.arange(width)[None, :] < examples.lengths[take][:, None]).astype(np.int32)
  weights = np.ones(size, np.float32)
  if fill:
    weights[len(rows) :] = 0.0
    mask[len(rows) :] = 0
    mask[len(rows) :, 0] = 1  # a filler row attends to one token: no empty softmax
  return {
    "input_ids": ids,
    "attention_mask": mask,
    "token_type_ids": examples.token_type_ids[take, :width],
    "labels": examples.labels[take],
    "weights": weights,
  }


def batch_for(
  examples: Examples, rows: np.ndarray, buckets: tuple[int, ...], size: int, pack: int
) -> dict:
  """``pack`` = 0: :func:`make_batch` (padded rows); ``pack`` = G > 0: a padding-free batch of
  ``G`` groups (:func:`train.data.packing.packed_batch`)."""
  if not pack:
    return make_batch(examples, rows, buckets, size)
  ex, row_counts = examples, bucket_lengths(size // pack, smallest=1)
  return packing.packed_batch(
    ex.input_ids, ex.token_type_ids, ex.lengths, ex.labels, rows, size, pack, ex.pad_id, row_counts
  )


def train_batches(
  examples: Examples,
  batch_size: int,
  buckets: tuple[int, ...],
  seed: int,
  start: int = 0,
  pack: int = 0,
) -> Iterator[dict]:
  """Micro-batches ``start, start + 1, ...`` of the endless deterministic stream (``pack``: see
  :func:`batch_for`)."""
  if batches_per_epoch(len(examples), batch_size) == 0:
    raise ValueError(
      f"the training set has {len(examples)} rows, fewer than one global batch of {batch_size}"
    )
  for rows in epoch_batches(len(examples), batch_size, seed, start):
    yield batch_for(examples, rows, buckets, batch_size, pack)


def eval_batches(
  examples: Examples, batch_size: int, buckets: tuple[int, ...], pack: int = 0
) -> Iterator[tuple[np.ndarray, dict]]:
  """``(rows, batch)`` over every row once, shortest first (less padding), last one filled."""
  order = np.argsort(examples.lengths, kind="stable")
  for i in range(0, len(order), batch_size):
    rows = order[i : i + batch_size]
    yield rows, batch_for(examples, rows, buckets, batch_size, pack)
