"""The README's first command: ``run_glue.py --config configs/quickstart.yaml``, offline.

A small BERT built from ``configs/quickstart/config.json`` (``--config_name``: random weights,
"from scratch") learns the synthetic sentiment task written by ``configs/tools/make_quickstart.py``.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import transformers
from test_glue_run import run

import lora_jax
from lora_jax import models
from train import run_glue
from train.tasks.glue import args as glue_args

REPO = pathlib.Path(__file__).resolve().parent.parent
FOLDER = REPO / "configs" / "quickstart"
CONFIG = "configs/quickstart.yaml"
MIN_ACCURACY = 0.85  # runs on 2 CPU cores end at 0.98-1.0 (seeds 1, 2, 42); chance is 0.5


def read_tsv(name: str) -> list[list[str]]:
  return [line.split("\t") for line in (FOLDER / name).read_text().splitlines()]


def test_generator_reproduces_the_committed_files(tmp_path):
  proc = subprocess.run(
    [sys.executable, str(REPO / "configs" / "tools" / "make_quickstart.py"), str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  committed = sorted(p.name for p in FOLDER.iterdir())
  assert sorted(p.name for p in tmp_path.iterdir()) == committed
  for name in committed:
    assert (tmp_path / name).read_bytes() == (FOLDER / name).read_bytes(), name
  assert sum((FOLDER / n).stat().st_size for n in committed) < 300_000  # commit-sized


def test_data_is_glue_sst2_shaped_balanced_and_disjoint():
  splits = {s: read_tsv(f"{s}.tsv") for s in ("train", "validation", "test")}
  assert splits["train"][0] == splits["validation"][0] == ["sentence", "label"]
  assert splits["test"][0] == ["index", "sentence"]
  sentences = {s: [r[0] for r in rows[1:]] for s, rows in splits.items() if s != "test"}
  sentences["test"] = [r[1] for r in splits["test"][1:]]
  assert [r[0] for r in splits["test"][1:]] == [str(i) for i in range(len(sentences["test"]))]
  assert sum(map(len, map(set, sentences.values()))) == sum(map(len, sentences.values()))
  assert len(set().union(*map(set, sentences.values()))) == sum(map(len, sentences.values()))
  for split in ("train", "validation"):
    labels = np.array([int(r[1]) for r in splits[split][1:]])
    assert set(labels) == {0, 1} and 0.45 < labels.mean() < 0.55, split
  negated = [s for s in sentences["train"] if " not " in s or " never " in s]
  assert 0.2 < len(negated) / len(sentences["train"]) < 0.4  # a bag of words is not enough


def test_tokenizer_loads_offline_and_keeps_whole_words():
  tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER)  # HF_HUB_OFFLINE=1: conftest
  config = transformers.AutoConfig.from_pretrained(FOLDER / "config.json")
  assert config.model_type == "bert" and config.vocab_size == len(tokenizer)
  sentence = read_tsv("validation.tsv")[1][0]
  ids = tokenizer(sentence)["input_ids"]
  tokens = tokenizer.convert_ids_to_tokens(ids)
  assert tokens == ["[CLS]", *sentence.split(), "[SEP]"]
  assert " ".join(tokens[1:-1]) == sentence  # round trip (decode() would drop " ." spaces)
  every = [r[0] for r in read_tsv("train.tsv")[1:]] + [r[1] for r in read_tsv("test.tsv")[1:]]
  assert tokenizer.unk_token_id not in {i for e in tokenizer(every)["input_ids"] for i in e}


@pytest.mark.parametrize(
  "argv, expected",
  [
    (
      ["--model_name_or_path", ""],
      "argument --model_name_or_path: empty, and no --config_name: give a checkpoint folder "
      "or Hub id, or --config_name to train a new model from scratch",
    ),
    (
      ["--model_name_or_path", "m", "--config_name", "c"],
      "argument --config_name: not allowed with --model_name_or_path ('c' and 'm')",
    ),
    (
      ["--config_name", str(FOLDER / "config.json")],
      "argument --tokenizer_name: required when --config_name is a file",
    ),
  ],
)
def test_model_source_errors_are_one_line(capsys, argv, expected):
  with pytest.raises(SystemExit) as e:
    glue_args.parse_args(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"run_glue.py: error: {expected}"), err


def test_model_source_defaults():
  args = glue_args.parse_args([])
  assert (args.model_name_or_path, args.config_name, args.tokenizer_name) == (
    glue_args.DEFAULT_MODEL,
    None,
    glue_args.DEFAULT_MODEL,
  )
  args = glue_args.parse_args(["--config", str(REPO / CONFIG)])  # paths beside the YAML file
  assert (args.model_name_or_path, args.config_name, args.tokenizer_name) == (
    None,
    str(FOLDER),
    str(FOLDER),
  )


def test_neither_model_nor_config_exits_2_with_one_line():
  proc = run("--config", CONFIG, "--config_name", "", "--model_name_or_path", "", timeout=60)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
    "run_glue.py: error: argument --model_name_or_path: empty, and no --config_name: give a "
    "checkpoint folder or Hub id, or --config_name to train a new model from scratch"
  ]


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
  out = tmp_path / "quickstart"
  proc = run("--config", CONFIG, "--output_dir", str(out), "--no-progress", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Training new model from scratch" in proc.stderr
  for name in ("metrics.jsonl", "eval_results.json", "curves.png", "predict_results.tsv"):
    assert (out / name).is_file(), name
  results = json.loads((out / "eval_results.json").read_text())
  assert results["eval_samples"] == 500 and results["eval_accuracy"] >= MIN_ACCURACY, results
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
  assert len(evals) >= 5 and evals[0] < 0.75 and evals[0] < evals[-1], evals
  assert len((out / "predict_results.tsv").read_text().splitlines()) == 501

  # The adapter (PEFT format) applies to the random base written beside it.
  adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert adapter_config["base_model_name_or_path"] == str(out / "base_model")
  tokenizer = transformers.AutoTokenizer.from_pretrained(out / "base_model")
  config = transformers.AutoConfig.from_pretrained(out / "base_model")
  module, variables = models.from_pretrained(out / "base_model", "sequence-classification")
  params = lora_jax.import_peft(out / "adapter", variables, config=config)
  validation = read_tsv("validation.tsv")[1:]
  batch = tokenizer([s for s, _ in validation], padding=True, return_tensors="np")
  logits = lora_jax.lora_apply(module.apply)(params, **batch)
  labels = np.array([int(y) for _, y in validation])
  accuracy = float(np.mean(np.argmax(logits, -1) == labels))
  assert abs(accuracy - results["eval_accuracy"]) <= 0.004, (accuracy, results)


def test_bad_input_found_while_running_exits_2_with_one_line(capsys, tmp_path):
  code = run_glue.main(["--config", str(REPO / CONFIG), "--train_file", str(tmp_path / "no.tsv"),
                        "--output_dir", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("run_glue.py: error: "), err
  assert "no.tsv" in err[0]
