"""bench/bank.py runs end to end (a small random Llama) and writes its ratios."""

from __future__ import annotations

import json

import pytest

from bench import bank


@pytest.mark.slow
def test_bank_bench_writes_every_ratio(tmp_path):
  out = tmp_path / "bank.json"
  result = bank.main(
    [
      "--model",
      "tiny",
      "--adapters",
      "2",
      "--batch",
      "4",
      "--seq",
      "8",
      "--new_tokens",
      "2",
      "--reps",
      "1",
      "--out",
      str(out),
    ]
  )
  saved = json.loads(out.read_text())
  assert saved == pytest.approx(result)
  for kind in ("train_step", "generate"):
    for k in ("mixed", "single", "separate"):
      assert saved[f"{kind}_{k}_s"] > 0 and saved[f"{kind}_{k}_tokens_per_s"] > 0
    assert saved[f"{kind}_mixed_over_single"] > 0
  assert saved["kernel_one_hot_over_gather"] > 0
