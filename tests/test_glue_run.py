"""train/run_glue.py as a user runs it: a subprocess with the embedded default config."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "train" / "run_glue.py"


def run(*argv, timeout=300) -> subprocess.CompletedProcess:
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  return subprocess.run(
    [sys.executable, str(SCRIPT), *argv],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.mark.slow
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
  # The reported accuracy and predictions are the saved adapter's: recompute its logits.
  logits = {
    split: _logits_of_saved_adapter(minilm_path, out / "adapter", sst2_dir / f"{split}.tsv", n)
    for split, n in (("validation", 64), ("test", 16))
  }
  labels = [int(line.split("\t")[1]) for line in _rows(sst2_dir / "validation.tsv", 64)]
  accuracy = float(np.mean(logits["validation"].argmax(-1) == np.array(labels)))
  assert results["eval_accuracy"] == pytest.approx(accuracy, abs=1e-6)
  predicted = [line.split("\t")[1] for line in _rows(out / "predict_results.tsv", 16)]
  assert predicted == [str(p) for p in logits["test"].argmax(-1)]


def _rows(path: pathlib.Path, n: int) -> list[str]:
  return path.read_text().splitlines()[1 : n + 1]


def _logits_of_saved_adapter(model_path, adapter, tsv, n):
  import transformers

  import lora_jax
  from lora_jax import models

  module, variables = models.from_pretrained(model_path, "sequence-classification", num_labels=2)
  config = transformers.AutoConfig.from_pretrained(model_path, num_labels=2)
  params = lora_jax.import_peft(adapter, variables, config=config)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
  sentences = [line.split("\t")[0] for line in _rows(tsv, n)]
  batch = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="np")
  logits = lora_jax.lora_apply(module.apply)(
    params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  )
  return np.asarray(logits)


def test_bad_flag_value_exits_with_one_line():
  proc = run("--config", "configs/sst2_minilm.yaml", "--parallel", "dp", timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    "run_glue.py: error: argument --parallel: invalid choice: 'dp' "
    "(choose from 'none', 'pmap', 'mesh')"
  ]
