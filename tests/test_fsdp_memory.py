"""Smoke test of ``bench/fsdp_memory.py``: run_clm.py's mesh step with the frozen base sharded
(``--shard_frozen``), planned from shapes over 8 forced CPU devices in a fresh process. XLA's
figures are per device: the plan's arguments hold the replicated state and an eighth of the
base."""

import doctest
import sys

from conftest import REPO

sys.path.insert(0, str(REPO))

from bench import fsdp_memory  # noqa: E402

# llama-tiny's leaves are all under _fsdp_spec's 64k elements (so never sharded): wider layers
# and vocabulary make every kernel and the embeddings shardable; two layers keep it seconds.
WIDER = {"hidden": 256, "ffn": 512, "vocab": 1024}
JOB = {"config": "llama-tiny-64x4-packed", "base": "bf16", "attention": "xla_chunked",
       "shard_frozen": True, "model": WIDER}  # fmt: skip


def test_sharded_base_is_an_eighth_per_device():
  row = fsdp_memory.run_one(JOB, "default", 8)
  assert "error" not in row, row.get("error")
  assert row["devices"] == 8 and row["rows_per_device"] == 4
  whole, held = row["base_bytes_whole"], row["base_bytes_per_device"]
  state = row["state_bytes_per_device"]
  # every leaf but the norms' scales (under 64k elements, replicated) split 8 ways
  assert whole / 8 <= held < whole / 8 + 8 * 1024
  # XLA's argument bytes are one device's: the state (replicated), its share of the base and
  # its rows (``weights``, which the loss does not read, is pruned: 1 KiB of slack)
  assert (
    state + held <= row["argument_bytes"] + 1024 <= state + held + row["batch_bytes_per_device"]
  )
  assert row["argument_bytes"] < state + whole / 4  # replicated, it would hold the whole base
  assert row["peak_bytes"] == (
    row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
  )
  assert any(k.startswith("all-gather") for k in row["collectives"])
  assert "| 8 | " in fsdp_memory.markdown([row]).splitlines()[-1]


def test_docstring_examples():
  result = doctest.testmod(fsdp_memory, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0
