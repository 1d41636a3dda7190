"""lora_jax._src.files.publish: what every export writes through (PEFT adapters, merged models)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lora_jax import LoraRule
from lora_jax import export_peft
from lora_jax import lora_init
from lora_jax._src.files import publish


def _params():
  base = {"params": {"dense": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]}}
  return lora_init(base, LoraRule(["dense"], rank=2), rng=jax.random.key(1))


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def test_exported_files_get_the_users_umask(tmp_path, umask_022):
  """safetensors writes its files 0600; an export others are meant to read gets 0644."""
  folder = export_peft(tmp_path / "adapter", _params(), base_model_name_or_path="x")
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
  assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_a_killed_exports_temporary_folder_is_removed_by_the_next(tmp_path):
  host = socket.gethostname()
  dead = tmp_path / f".adapter.tmp-{host}-{_dead_pid()}-abc"
  live = tmp_path / f".adapter.tmp-{host}-{os.getpid()}-def"  # an export running right now
  elsewhere = tmp_path / f".adapter.tmp-another-host-{_dead_pid()}-ghi"  # not ours to judge
  for d in (dead, live, elsewhere):
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"half")
  export_peft(tmp_path / "adapter", _params(), base_model_name_or_path="x")
  assert not dead.exists() and live.exists() and elsewhere.exists()
  left = sorted(p.name for p in tmp_path.iterdir())
  assert left == sorted(["adapter", live.name, elsewhere.name])


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "config.json").write_text("old")

  def write(tmp):
    (tmp / "config.json").write_text("new")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    publish(tmp_path / "out", write, last=("config.json",))
  assert (tmp_path / "out" / "config.json").read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_flipped_bit_in_an_exported_adapter_is_refused_by_import_peft(tmp_path):
  """Principle 3: export_peft's files carry a CRC-32 of each tensor (safetensors metadata, which
  PEFT ignores); import_peft refuses a tensor that does not match it, naming the file."""
  from lora_jax import import_peft

  params = _params()
  folder = export_peft(tmp_path / "adapter", params, base_model_name_or_path="x")
  weights = folder / "adapter_model.safetensors"
  original = weights.read_bytes()
  base = {
    "params": {
      "dense": {k: v for k, v in params["params"]["dense"].items() if k in ("kernel", "bias")}
    }
  }
  import_peft(folder, base)  # intact: loads
  for offset in (len(original) - 1, len(original) - 17):  # inside the last tensors' data
    damaged = bytearray(original)
    damaged[offset] ^= 0x10
    weights.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors'.*fail the CRC-32"):
      import_peft(folder, base)
  weights.write_bytes(original)
