"""Tensor files and atomic folders: the I/O every lora_jax writer and reader shares.

* safetensors files read lazily (:class:`LazyTensor`: shape and dtype from the header, values a
  memory-mapped view read when indexed), every dtype included (bfloat16 and float8 through
  ``ml_dtypes``), or whole; written from numpy-convertible arrays;
* ``pytorch_model.bin`` / ``adapter_model.bin`` files read with ``torch.load(weights_only=True)``
  (needs torch);
* :func:`publish`: a folder's files written into a temporary sibling and moved in one by one,
  so that each appears complete or not at all.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import struct
import tempfile
import zlib
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


# safetensors metadata key under which lora_jax keeps a CRC-32 of each tensor it writes
CRC_KEY = "lora_jax.crc32"


def crc32(array) -> int:
  """CRC-32 of an array's bytes (C order), as saved adapters and exports record it."""
  return zlib.crc32(np.ascontiguousarray(np.asarray(array)))


def write_safetensors(tensors: Mapping[str, Any], path, metadata: Mapping[str, str]) -> None:
  """Writes numpy-convertible ``tensors`` to ``path`` (bfloat16 included), with a CRC-32 of
  each in the file's metadata (``lora_jax.crc32``, a JSON object; readers that do not know it,
  PEFT and transformers, ignore it) for :func:`read_safetensors` to check."""
  from safetensors.numpy import save_file

  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  crcs = json.dumps({k: crc32(v) for k, v in sorted(arrays.items())}, separators=(",", ":"))
  save_file(arrays, path, metadata={**metadata, CRC_KEY: crcs})


def safetensors_metadata(path) -> dict[str, str]:
  """The ``__metadata__`` of a safetensors file's header (``{}`` if it has none)."""
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    return dict(json.loads(f.read(length)).get("__metadata__") or {})


def read_safetensors(path) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file; a damaged file raises a ``ValueError`` naming it.

  Tensors written with a CRC-32 (:func:`write_safetensors`) must match it: a flipped bit is
  refused, not read as other numbers.
  """
  try:
    tensors = read_safetensors_file(Path(path))
    crcs = json.loads(safetensors_metadata(path).get(CRC_KEY, "{}"))
  except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError, ...
    size = os.path.getsize(path) if os.path.exists(path) else None
    raise ValueError(
      f"{str(path)!r} ({size} bytes) is not a readable safetensors file; it is probably "
      f"truncated or corrupted (re-download or re-export it): {type(e).__name__}: {e}"
    ) from None
  bad = sorted(k for k, crc in crcs.items() if k in tensors and crc32(tensors[k]) != crc)
  if bad:
    raise ValueError(
      f"{str(path)!r}: tensors {bad[:5]} fail the CRC-32 written with them; the file is "
      "damaged (bit rot, an interrupted copy): re-export or copy it again"
    )
  return tensors


def _umask() -> int:
  mask = os.umask(0o022)  # the only way to read it is to set it: put it back at once
  os.umask(mask)
  return mask


def _remove_abandoned(parent: Path, prefix: str) -> None:
  """Removes ``<prefix><pid>-*`` folders whose process (on this machine) no longer runs."""
  for tmp in parent.glob(f"{glob.escape(prefix)}*"):
    pid = tmp.name[len(prefix) :].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(tmp, ignore_errors=True)
    except PermissionError:
      pass  # another user's live process


def publish(directory, write: Callable[[Path], None], *, last: Sequence[str] = ()) -> Path:
  """Runs ``write(tmp)`` into a fresh sibling of ``directory``, then moves each file in.

  Every file appears complete or not at all (``os.replace``); a failed ``write`` leaves
  ``directory`` as it was. Files named in ``last`` (configs) move in after the others, so a
  reader that finds the new config also finds the new weights. Files get the permissions of
  the user's umask (writers such as safetensors create them ``0600``), and temporary siblings
  that a killed export of this machine left behind are removed.
  """
  directory = Path(directory).expanduser()
  if directory.exists() and not directory.is_dir():
    raise NotADirectoryError(f"cannot export to {str(directory)!r}: it is a file")
  directory.parent.mkdir(parents=True, exist_ok=True)
  prefix = f".{directory.name}.tmp-{socket.gethostname()}-"
  _remove_abandoned(directory.parent, prefix)
  tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=directory.parent))
  mode = 0o666 & ~_umask()
  try:
    write(tmp)
    directory.mkdir(exist_ok=True)
    files = [Path(root) / name for root, _, names in os.walk(tmp) for name in names]
    for src in sorted(files, key=lambda f: (f.name in last, str(f))):
      dst = directory / src.relative_to(tmp)
      dst.parent.mkdir(parents=True, exist_ok=True)
      os.chmod(src, mode)
      os.replace(src, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory
