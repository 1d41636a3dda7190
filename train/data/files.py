"""Data files every task reads: checks before parsing, and ``datasets`` loading with one-line
errors.

Bad input is refused before any training, in one line naming the file: an unsupported suffix, a
file that does not exist, an empty file, a file of a header only (:func:`check_has_rows`), a file
that does not parse (:func:`load_dataset_file`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

LINE_FORMATS = {".tsv": True, ".csv": True, ".jsonl": False}  # suffix: has a header line


def check_has_rows(path: str) -> None:
  """A 0-byte or blank file is refused as ``empty``; a CSV / TSV with a header line and no row
  after it as ``has a header but no rows`` (line formats are read up to their second row only).
  """
  file = pathlib.Path(path)
  if file.stat().st_size == 0:
    raise ValueError(f"data file {path!r} is empty")
  suffix = file.suffix.lower()
  if suffix not in LINE_FORMATS:
    return
  with open(file, encoding="utf-8", errors="replace") as f:
    lines = (line for line in f if line.strip())  # pandas and JSON lines skip blank lines
    if next(lines, None) is None:
      raise ValueError(f"data file {path!r} is empty (blank lines only)")
    if LINE_FORMATS[suffix] and next(lines, None) is None:
      raise ValueError(f"data file {path!r} has a header but no rows")


def load_dataset_file(builder: str, path: str, split: str, **kwargs):
  """``datasets.load_dataset(builder, data_files={split: path})[split]``; a file that cannot be
  parsed, or that holds no row, is a one-line ``ValueError`` naming it."""
  import datasets

  try:
    return datasets.load_dataset(builder, data_files={split: path}, **kwargs)[split]
  except ValueError as e:  # datasets: 'Instruction "train" corresponds to no data!'
    if "corresponds to no data" not in str(e):
      raise
    raise ValueError(f"data file {path!r} holds no rows") from e
  except datasets.exceptions.DatasetGenerationError as e:
    cause = " ".join(str(e.__cause__ or e).split())
    raise ValueError(f"data file {path!r} could not be read as {builder}: {cause}") from e


def load_file(path: str, split: str, builders: Mapping[str, str],
              options: Mapping[str, dict] | None = None):  # fmt: skip
  """The file ``path`` as split ``split``: read by ``builders[suffix]`` (a ``datasets``
  builder: ``"csv"``, ``"json"``, ...) with ``options[suffix]`` (keyword arguments), after
  :func:`check_has_rows`.

  Raises:
    ValueError: a suffix not in ``builders``, an empty or unreadable file.
    FileNotFoundError: the file does not exist.

  Example:
    >>> load_file("train.xml", "train", {".csv": "csv"})
    Traceback (most recent call last):
    ...
    ValueError: data file 'train.xml' has extension '.xml'; supported: ['.csv']
  """
  suffix = pathlib.Path(path).suffix.lower()
  if suffix not in builders:
    raise ValueError(f"data file {path!r} has extension {suffix!r}; supported: {sorted(builders)}")
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"data file {path!r} does not exist")
  check_has_rows(path)  # empty, blank, or a CSV header only
  return load_dataset_file(builders[suffix], path, split, **(options or {}).get(suffix, {}))
