"""save_adapter / load_adapter: bit-exact round trips, what is written, errors, crash safety."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import with_numpy_adapters

from lora_jax import KernelLayout
from lora_jax import LoraRule
from lora_jax import adapter_info
from lora_jax import load_adapter
from lora_jax import lora_init
from lora_jax import save_adapter
from lora_jax._src import paths

REPO = pathlib.Path(__file__).resolve().parent.parent

# Orbax's fixed cost per adapter directory (checkpoint metadata, OCDBT manifests, the JSON
# description); measured ~10 KiB for the MiniLM-shaped adapter below, bounded generously.
SIZE_CONSTANT = 64 * 1024


def _base(hidden=16, layers=2, seed=0):
  """A base tree (numpy leaves) with Dense, multi-axis Dense, Conv, Embed and a bf16 head."""
  rng = np.random.RandomState(seed)

  def dense(i, o):
    return {"kernel": rng.randn(i, o).astype(np.float32), "bias": np.zeros(o, np.float32)}

  layer = {
    str(i): {"query": dense(hidden, hidden), "value": dense(hidden, hidden)} for i in range(layers)
  }
  return {
    "params": {
      "encoder": {"layer": layer},
      "heads": {"kernel": rng.randn(hidden, 2, 4).astype(np.float32)},
      "conv": {"kernel": rng.randn(3, 3, 2, 5).astype(np.float32)},
      "embed": {"embedding": rng.randn(11, hidden).astype(np.float32)},
      "classifier": {
        "kernel": rng.randn(hidden, 3).astype(jnp.bfloat16),
        "bias": np.zeros(3, jnp.bfloat16),
      },
    },
    "batch_stats": {"mean": np.zeros(4, np.float32)},
  }


LAYOUTS = {
  "params/heads": KernelLayout((0,), (1, 2), "dense"),
  "params/conv": KernelLayout((0, 1, 2), (3,), "conv"),
}
RULES = [
  LoraRule(["query"], rank=4, alpha=8, dropout=0.1),
  LoraRule(["value", "embed"], rank=2, rslora=True),
  LoraRule(["heads", "conv"], rank=3, alpha=1.5),
]


def _adapted(base, seed=1):
  params = with_numpy_adapters(base, RULES, seed, LAYOUTS)
  # The head trains beside the adapters: give it values the base does not have.
  head = params["params"]["classifier"]
  head = {k: (np.asarray(v, np.float32) + seed).astype(v.dtype) for k, v in head.items()}
  return {**params, "params": {**params["params"], "classifier": head}}


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)  # LoraSpecs included (static)
  for (path, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
  ):
    g, w = np.asarray(g), np.asarray(w)
    assert g.dtype == w.dtype, (paths.keypath_str(path), g.dtype, w.dtype)
    np.testing.assert_array_equal(g, w, err_msg=paths.keypath_str(path))


def _dir_size(path) -> int:
  return sum(f.stat().st_size for f in pathlib.Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# Round trips.


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  base = _base()
  params = _adapted(base)
  folder = tmp_path_factory.mktemp("adapter") / "run"
  out = save_adapter(folder, params, extra_trainable=["classifier"], metadata={"base": "tiny"})
  assert pathlib.Path(out) == folder
  return base, params, folder


def test_round_trip_is_bit_exact(saved):
  base, params, folder = saved
  _assert_trees_equal(load_adapter(folder, base), params)


def test_round_trip_into_adapted_tree_and_bare_params(saved):
  base, params, folder = saved
  other = _adapted(base, seed=5)  # same adapters, other values: replaced
  _assert_trees_equal(load_adapter(folder, other), params)
  _assert_trees_equal(load_adapter(str(folder), base["params"]), params["params"])


def test_only_adapters_and_extra_leaves_are_written(saved):
  base, params, folder = saved
  info = adapter_info(folder)
  written = sorted(r["path"] for r in info["leaves"])
  modules = ["conv", "embed", "encoder/layer/0/query", "encoder/layer/0/value"]
  modules += ["encoder/layer/1/query", "encoder/layer/1/value", "heads"]
  expected = [f"params/{m}/lora_{x}" for m in modules for x in "ab"]
  expected += ["params/classifier/bias", "params/classifier/kernel"]
  assert written == sorted(expected)
  assert {r["dtype"] for r in info["leaves"] if "classifier" in r["path"]} == {"bfloat16"}
  assert info["extra_trainable"] == ["classifier"]
  assert info["metadata"] == {"base": "tiny"}
  assert info["lora_jax_version"]
  heads = next(r for r in info["adapters"] if r["path"] == "params/heads")
  assert heads == {
    "path": "params/heads",
    "rank": 3,
    "alpha": 1.5,
    "rslora": False,
    "dropout": 0.0,
    "weight": "kernel",
    "in_axes": [0],
    "out_axes": [1, 2],
    "rule": "['heads', 'conv']",
    "stacked": 0,
    "init": "gaussian",
    "use_dora": False,
    "weight_shape": [16, 2, 4],
  }


def test_saves_the_trainable_half_of_a_partition(tmp_path):
  import lora_jax

  base = _base()
  params = _adapted(base)
  trainable, _ = lora_jax.partition(params, lora_jax.trainable_mask(params, ["classifier"]))
  save_adapter(tmp_path / "a", trainable, extra_trainable=["classifier"])
  _assert_trees_equal(load_adapter(tmp_path / "a", base), params)


def test_overwrite_replaces_and_keeps_one_checkpoint(tmp_path):
  base = _base()
  folder = tmp_path / "a"
  save_adapter(folder, _adapted(base, seed=1), metadata={"v": 1})
  second = _adapted(base, seed=2)
  save_adapter(folder, second, metadata={"v": 2})
  assert sorted(p.name for p in folder.iterdir()) == ["1", "lora_jax_adapter.json"]
  assert adapter_info(folder)["metadata"] == {"v": 2}
  got = load_adapter(folder, base)["params"]["encoder"]["layer"]["0"]["query"]["lora_b"]
  np.testing.assert_array_equal(got, second["params"]["encoder"]["layer"]["0"]["query"]["lora_b"])
  # A crash while Orbax deleted the older step leaves a partial step behind: still writable.
  (folder / "0").mkdir()
  save_adapter(folder, _adapted(base, seed=3), metadata={"v": 3})
  assert adapter_info(folder)["metadata"] == {"v": 3}
  assert sorted(p.name for p in folder.iterdir()) == ["2", "lora_jax_adapter.json"]


def test_size_is_the_adapter_bytes_plus_a_constant(tmp_path):
  """A MiniLM-shaped adapter (6 layers, r=8 on query and value, 384 wide, 2-label head)."""
  hidden, layers = 384, 6
  zeros = {"kernel": np.zeros((hidden, hidden), np.float32), "bias": np.zeros(hidden, np.float32)}
  base = {
    "encoder": {"layer": {str(i): {"query": zeros, "value": zeros} for i in range(layers)}},
    "classifier": {"kernel": np.zeros((hidden, 2), np.float32), "bias": np.zeros(2, np.float32)},
  }
  # Random factors: trained values barely compress.
  params = with_numpy_adapters(base, LoraRule(["query", "value"], rank=8), seed=0)
  params["classifier"] = {
    "kernel": np.random.randn(hidden, 2).astype(np.float32),
    "bias": 1.0 + np.zeros(2, np.float32),
  }
  save_adapter(tmp_path / "a", params, extra_trainable=["classifier"])
  n = layers * 2 * (2 * hidden * 8) + hidden * 2 + 2
  assert n == 74_498
  size = _dir_size(tmp_path / "a")
  print(f"adapter params {n}, x4 = {4 * n} bytes, directory {size} bytes")
  assert 0.9 * 4 * n <= size <= 1.1 * 4 * n + SIZE_CONSTANT
  assert size < 0.1 * layers * 2 * hidden * hidden * 4  # the frozen kernels are not there


# ---------------------------------------------------------------------------------------------
# Errors.


def test_mismatched_base_lists_every_problem_in_one_error(saved):
  base, _, folder = saved
  wrong = jax.tree.map(lambda x: x, base)
  wrong["params"]["encoder"]["layer"]["0"]["query"]["kernel"] = np.zeros((16, 15), np.float32)
  del wrong["params"]["encoder"]["layer"]["1"]["value"]
  del wrong["params"]["classifier"]["bias"]
  with pytest.raises(ValueError) as e:
    load_adapter(folder, wrong)
  msg = str(e.value)
  assert "3 mismatch(es)" in msg
  assert "params/encoder/layer/0/query/kernel: the adapter needs a weight of shape (16, 16)" in msg
  assert "base has (16, 15)" in msg
  assert "params/encoder/layer/1/value/kernel" in msg and "base has none" in msg
  assert "params/classifier/bias: saved with shape (3,), base has no such leaf" in msg


def test_base_with_other_adapters_is_refused(saved):
  base, _, folder = saved
  extra = lora_init(base, LoraRule(".*classifier", rank=1), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="params/classifier: base carries an adapter"):
    load_adapter(folder, extra)


def test_not_an_adapter_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no adapter directory"):
    load_adapter(tmp_path / "missing", {})
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a lora_jax adapter directory"):
    load_adapter(tmp_path / "empty", {})
  peft = tmp_path / "peft"
  peft.mkdir()
  (peft / "adapter_config.json").write_text("{}")
  with pytest.raises(ValueError, match="looks like a PEFT adapter: load it with .*import_peft"):
    adapter_info(peft)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="it is a file"):
    load_adapter(tmp_path / "file", {})


def test_save_refuses_foreign_directories_and_bad_input(tmp_path):
  base = _base()
  params = _adapted(base)
  folder = tmp_path / "checkpoints"
  (folder / "7").mkdir(parents=True)  # e.g. someone's training checkpoint: never deleted
  (folder / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match=r"refusing to save.*\['7', 'notes.txt'\]"):
    save_adapter(folder, params)
  assert (folder / "7").exists()
  with pytest.raises(ValueError, match="carry no LoRA adapters"):
    save_adapter(tmp_path / "b", base)
  with pytest.raises(ValueError, match="'nope' matches no parameter"):
    save_adapter(tmp_path / "b", params, extra_trainable=["nope"])
  with pytest.raises(TypeError, match="metadata=.*not JSON-serialisable"):
    save_adapter(tmp_path / "b", params, metadata={"x": object()})


# Orbax's restore leaves a callback for its closed event loop after TensorStore fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_files_give_a_clear_error(tmp_path):
  base = _base()
  folder = save_adapter(tmp_path / "a", _adapted(base))
  data = [p for p in (folder / "0" / "adapter").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert data, "expected OCDBT data files"
  for p in data:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with pytest.raises(ValueError, match="damaged"):
    load_adapter(folder, base)
  (folder / "0" / "lora_jax" / "metadata").write_text('{"format": "lora_jax.ad')
  with pytest.raises(ValueError, match="description .* cannot be read; the checkpoint is damaged"):
    load_adapter(folder, base)


def test_a_flipped_bit_in_the_data_files_is_refused_or_harmless(tmp_path):
  """Bit rot or a damaged copy: each of 24 single-bit flips spread over the array data files is
  refused in one line naming the adapter, or lands in bytes nothing reads (the adapter then
  loads bit-identical); no flip loads as other numbers. Without the CRC-32 check, 22 of these 24
  flips loaded silently."""
  base = _base(hidden=256)
  params = _adapted(base)
  folder = save_adapter(tmp_path / "a", params, extra_trainable=["classifier"])
  data = [p for p in (folder / "0" / "adapter").rglob("*") if p.is_file() and "/d/" in str(p)]
  data.sort(key=lambda p: (p.stat().st_size, p.name))  # their names are random: order by size
  sizes = [p.stat().st_size for p in data]
  total, refused = sum(sizes), 0
  for k in range(24):
    offset, i = (2 * k + 1) * total // 48, 0
    while offset >= sizes[i]:
      offset, i = offset - sizes[i], i + 1
    original = data[i].read_bytes()
    flipped = bytearray(original)
    flipped[offset] ^= 1 << (k % 8)
    data[i].write_bytes(bytes(flipped))
    try:
      loaded = load_adapter(folder, base)
    except ValueError as e:
      assert str(folder) in str(e) and "\n" not in str(e), str(e)
      refused += 1
    else:
      _assert_trees_equal(loaded["params"], params["params"])
    finally:
      data[i].write_bytes(original)
  assert refused >= 20


# ---------------------------------------------------------------------------------------------
# Crash safety: a save killed part-way leaves the previous adapter loadable.

_CHILD = textwrap.dedent(
  """
  import builtins, os, shutil, sys, time
  import numpy as np
  from lora_jax import LoraSpec, save_adapter

  folder, kind, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])

  def params(version):
    spec = LoraSpec(rank=2, alpha=2.0, rslora=False, dropout=0.0, weight="kernel",
                    in_axes=(0,), out_axes=(1,))
    full = lambda *shape: np.full(shape, version, np.float32)
    return {"dense": {"kernel": np.zeros((64, 32), np.float32), "lora_a": full(64, 2),
                      "lora_b": full(2, 32), "lora_spec": spec}}

  # Stall at the nth file-system operation of one kind that the save makes from Python (the
  # array bytes are written by TensorStore in C++, between these points).
  seen = {}
  def stall_at(module, name, kind_name=None):
    real = getattr(module, name)
    def op(*args, **kwargs):
      k = kind_name or name
      if k == "open" and not any(c in (args[1] if len(args) > 1 else kwargs.get("mode", "r"))
                                 for c in "wax"):
        return real(*args, **kwargs)
      seen[k] = seen.get(k, 0) + 1
      if k == kind and seen[k] == nth:
        print("STALL", k, nth, str(args[0])[-80:], flush=True)
        time.sleep(600)
      return real(*args, **kwargs)
    setattr(module, name, op)

  for name in ("makedirs", "mkdir", "rename", "replace", "remove", "unlink", "rmdir"):
    stall_at(os, name)
  stall_at(shutil, "rmtree")
  stall_at(builtins, "open")
  save_adapter(folder, params(2), metadata={"version": 2})
  print("DONE", dict(sorted(seen.items())), flush=True)
  """
)


def _spawn(folder, kind: str, nth: int):
  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.Popen(
    [sys.executable, "-c", _CHILD, str(folder), kind, str(nth)],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    env=env,
  )
  watchdog = threading.Timer(120, proc.kill)  # never hang the suite
  watchdog.start()
  return proc, watchdog


def _tiny(version):
  from lora_jax import LoraSpec

  spec = LoraSpec(
    rank=2, alpha=2.0, rslora=False, dropout=0.0, weight="kernel", in_axes=(0,), out_axes=(1,)
  )
  full = lambda *shape: np.full(shape, version, np.float32)  # noqa: E731
  return {
    "dense": {
      "kernel": np.zeros((64, 32), np.float32),
      "lora_a": full(64, 2),
      "lora_b": full(2, 32),
      "lora_spec": spec,
    }
  }


def _assert_version(folder, version):
  base = {"dense": {"kernel": np.zeros((64, 32), np.float32)}}
  loaded = load_adapter(folder, base)["dense"]
  assert adapter_info(folder)["metadata"] == {"version": version}
  np.testing.assert_array_equal(loaded["lora_a"], np.full((64, 2), version, np.float32))
  np.testing.assert_array_equal(loaded["lora_b"], np.full((2, 32), version, np.float32))


# (kind, n, the adapter a kill there leaves), each stall just before the operation: the first
# directory made, a metadata file written, the commit renames of each item and of the whole
# step (Orbax publishes a finished temporary directory), the start of deleting the previous
# step, and half-way through it.
KILL_POINTS = [
  ("mkdir", 1, 1),
  ("open", 2, 1),
  ("rename", 1, 1),
  ("rename", 2, 1),
  ("rename", 3, 1),
  ("rmtree", 1, 2),
  ("unlink", 5, 2),
]


def test_a_save_killed_at_chosen_points_leaves_a_whole_adapter(tmp_path):
  """SIGKILL while a save is stalled at each chosen point: the adapter in the folder is the
  previous one or the new one, whole, and the next save cleans up what the kill left."""
  procs = []
  for i, (kind, nth, _) in enumerate(KILL_POINTS):
    folder = tmp_path / str(i)
    save_adapter(folder, _tiny(1), metadata={"version": 1})
    procs.append((folder, *_spawn(folder, kind, nth)))
  for (folder, proc, watchdog), (kind, nth, version) in zip(procs, KILL_POINTS, strict=True):
    try:
      line = proc.stdout.readline().strip()
      assert line.startswith(f"STALL {kind} {nth}"), f"the save never reached {kind} {nth}: {line}"
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    finally:
      watchdog.cancel()
    assert adapter_info(folder)["metadata"] == {"version": version}, (kind, nth)
    _assert_version(folder, version)
    save_adapter(folder, _tiny(3), metadata={"version": 3})  # the next save cleans up
    _assert_version(folder, 3)
    assert not any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir()), (kind, nth)
