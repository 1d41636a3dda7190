"""train/run_glue.py as a user runs it: a subprocess with the embedded default config."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train" / "run_glue.py"


def run(*argv, timeout=300) -> subprocess.CompletedProcess:
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  return subprocess.run(
    [sys.executable, str(SCRIPT), *argv],
    cwd=REPO,  # the config's paths are relative to the checkout
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_default_config_end_to_end(minilm_path, sst2_dir, tmp_path):
  out = tmp_path / "run"
  proc = run(
    "--config",
    "configs/sst2_minilm.yaml",
    "--max_steps",
    "1",  # each new batch shape costs a MiniLM compilation
    "--logging_steps",
    "1",
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "64",
    "--do_predict",
    "--max_predict_samples",
    "16",
    "--output_dir",
    str(out),
    "--no-progress",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "eval_accuracy=" in proc.stdout
  for name in ("metrics.jsonl", "eval_results.json", "curves.png", "predict_results.tsv"):
    assert (out / name).is_file(), name
  assert (out / "checkpoints" / "1").is_dir()
  assert (out / "adapter" / "adapter_model.safetensors").is_file()
  results = json.loads((out / "eval_results.json").read_text())
  assert results["step"] == 1 and results["eval_samples"] == 64
  assert 0.0 <= results["eval_accuracy"] <= 1.0
  assert len((out / "predict_results.tsv").read_text().splitlines()) == 17


def test_bad_flag_value_exits_with_one_line():
  proc = run("--config", "configs/sst2_minilm.yaml", "--parallel", "dp", timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    "run_glue.py: error: argument --parallel: invalid choice: 'dp' "
    "(choose from 'none', 'pmap', 'mesh')"
  ]
