"""Checkpoint folders: a local folder or Hub repo, and its tensors read lazily from disk.

:func:`open_checkpoint` maps every tensor name of a Hugging Face checkpoint to a lazy tensor
(``lora_jax._src.files.LazyTensor``): its shape and dtype come from the file header, and its
values are a memory-mapped view of the file, read only when (and as far as) they are indexed.
A loader can therefore turn one tensor at a time into a device array, or read only the slice
one device holds, and a checkpoint never sits in host memory twice. ``model.safetensors`` and
sharded ``model.safetensors.index.json`` are read this way, every safetensors dtype included
(bfloat16 and float8 through ``ml_dtypes``); ``pytorch_model.bin`` files need torch and are
read whole.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lora_jax._src.files import LazyTensor
from lora_jax._src.files import read_torch_file
from lora_jax._src.files import safetensors_header

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)


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
