"""Checkpoint files: a local folder or Hub repo, and its tensors read lazily from disk.

:func:`open_checkpoint` maps every tensor name of a Hugging Face checkpoint to a
:class:`LazyTensor`: its shape and dtype come from the file header, and its values are a
memory-mapped view of the file, read only when (and as far as) they are indexed. A loader can
therefore turn one tensor at a time into a device array, or read only the slice one device
holds, and a checkpoint never sits in host memory twice. ``model.safetensors`` and sharded
``model.safetensors.index.json`` are read this way, every safetensors dtype included
(bfloat16 and float8 through ``ml_dtypes``); ``pytorch_model.bin`` files need torch and are
read whole.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)

_DTYPES = {
  "F64": "<f8",
  "F32": "<f4",
  "F16": "<f2",
  "I64": "<i8",
  "I32": "<i4",
  "I16": "<i2",
  "I8": "i1",
  "U8": "u1",
  "U16": "<u2",
  "U32": "<u4",
  "U64": "<u8",
  "BOOL": "?",
}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _dtype(code: str, path: Path) -> np.dtype:
  if code in _ML_DTYPES:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, _ML_DTYPES[code]))
  if code not in _DTYPES:
    raise ValueError(f"{str(path)!r}: unsupported safetensors dtype {code!r}")
  return np.dtype(_DTYPES[code])


class LazyTensor:
  """One tensor of a checkpoint file: ``shape`` and ``dtype`` known, values read on indexing.

  ``np.asarray(t)`` gives a read-only memory-mapped view (no copy); ``t[index]`` a view of a
  slice. Copy (``np.array(..., dtype=...)``) what must outlive the file.
  """

  def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
    self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def view(self) -> np.ndarray:
    if not self.shape or 0 in self.shape:
      count = int(np.prod(self.shape))
      with open(self.path, "rb") as f:
        f.seek(self.offset)
        data = f.read(count * self.dtype.itemsize)
      return np.frombuffer(data, self.dtype, count).reshape(self.shape)
    return np.memmap(self.path, self.dtype, "r", self.offset, self.shape)

  def __array__(self, dtype=None, copy=None):
    array = self.view()
    return array if dtype is None else array.astype(dtype)

  def __getitem__(self, index) -> np.ndarray:
    return self.view()[index]

  def __repr__(self) -> str:
    return f"LazyTensor({self.path.name}, shape={self.shape}, dtype={self.dtype})"


def safetensors_header(path: Path) -> dict[str, LazyTensor]:
  """The tensors of one safetensors file as :class:`LazyTensor` s (only the header is read).

  Raises:
    ValueError: the file is not a complete safetensors file (truncated, damaged, or another
      format); the message names it.
  """
  path = Path(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{str(path)!r} ({size} bytes) is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", head)
    if length > size - 8:
      raise ValueError(
        f"{str(path)!r} ({size} bytes) declares a {length}-byte header: truncated or not a "
        "safetensors file"
      )
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{str(path)!r}: its safetensors header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{str(path)!r}: its safetensors header is not a JSON object")
  header.pop("__metadata__", None)
  out = {}
  for name, info in header.items():
    dtype = _dtype(info["dtype"], path)
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape)) * dtype.itemsize or 8 + length + end > size:
      raise ValueError(
        f"{str(path)!r}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit the file "
        f"({size} bytes); the file is truncated or damaged"
      )
    out[name] = LazyTensor(path, 8 + length + start, shape, dtype)
  return out


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as read-only memory-mapped numpy arrays."""
  return {name: t.view() for name, t in safetensors_header(Path(path)).items()}


def read_torch_file(path: Path) -> dict[str, np.ndarray]:
  """All tensors of a ``pytorch_model.bin`` (needs torch; bfloat16 becomes float32)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"{str(path)!r} is a PyTorch checkpoint and reading it needs torch, which is not "
      "installed: `pip install torch` (CPU is enough), or convert it to model.safetensors"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {
    name: (t.float() if t.dtype == torch.bfloat16 else t).detach().numpy()
    for name, t in state.items()
  }


def _shards(folder: Path, index_name: str) -> list[Path]:
  weight_map = json.loads((folder / index_name).read_text())["weight_map"]
  return [folder / shard for shard in sorted(set(weight_map.values()))]


def open_checkpoint(folder: str | Path) -> Mapping[str, LazyTensor | np.ndarray]:
  """Every tensor of the checkpoint in ``folder`` by Hugging Face name, read lazily.

  Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json`` (shards),
  ``pytorch_model.bin``, ``pytorch_model.bin.index.json`` (the last two need torch and are
  read into memory).

  Raises:
    FileNotFoundError: no weights file in ``folder`` (the files present are listed).
  """
  folder = Path(folder)
  if (folder / SAFETENSORS).exists():
    return safetensors_header(folder / SAFETENSORS)
  if (folder / SAFETENSORS_INDEX).exists():
    out: dict = {}
    for shard in _shards(folder, SAFETENSORS_INDEX):
      out.update(safetensors_header(shard))
    return out
  if (folder / TORCH_BIN).exists():
    return read_torch_file(folder / TORCH_BIN)
  if (folder / TORCH_BIN_INDEX).exists():
    out = {}
    for shard in _shards(folder, TORCH_BIN_INDEX):
      out.update(read_torch_file(shard))
    return out
  present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
  raise FileNotFoundError(
    f"no checkpoint in {str(folder)!r}: expected one of {list(WEIGHT_FILES)}; found {present}"
  )


def read_state_dict(folder: str | Path) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint in ``folder``, by Hugging Face name, as numpy arrays.

  Safetensors tensors are read-only memory-mapped views (see :func:`open_checkpoint`).
  """
  return {name: np.asarray(t) for name, t in open_checkpoint(folder).items()}


def resolve_folder(
  name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | None = None
) -> Path:
  """A local model folder, or a Hub repo id downloaded (config + weights only) to the HF cache.

  Safetensors weights are fetched when the repo has them, else ``pytorch_model*.bin``.
  """
  if Path(name_or_path).is_dir():
    return Path(name_or_path)
  name = str(name_or_path)
  if name.startswith(("/", ".", "~")) or Path(name).exists():
    raise FileNotFoundError(f"{name!r} is not a model folder (and not a Hub repo id)")
  import huggingface_hub

  kw = dict(repo_id=name, revision=revision, cache_dir=cache_dir)
  folder = Path(
    huggingface_hub.snapshot_download(
      **kw, allow_patterns=["config.json", "model*.safetensors", SAFETENSORS_INDEX]
    )
  )
  if not any((folder / f).exists() for f in (SAFETENSORS, SAFETENSORS_INDEX)):
    folder = Path(
      huggingface_hub.snapshot_download(
        **kw, allow_patterns=["config.json", "pytorch_model*.bin", TORCH_BIN_INDEX]
      )
    )
  return folder
