"""``run_clm.py --adapter_column``: several adapters trained at once, one adapter bank over the
base, one PEFT folder per name (issue 29).

The data: the quickstart's questions (configs/clm_quickstart), each asked twice, answered with a
fixed date that depends on the adapter ("a" or "b") only. One adapter cannot learn both answers
to the same question; a bank whose rows reach their own adapters learns each in about 40 steps.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import transformers
from conftest import REPO
from helpers import script_main

from train import run_clm
from train.data import clm as clm_data
from train.engine import outputs
from train.tasks.clm import sampler as clm_sampler

CONFIG = str(REPO / "configs" / "clm_quickstart.yaml")
FOLDER = REPO / "configs" / "clm_quickstart"
ANSWERS = {"a": "2000 - 01 - 01", "b": "1990 - 12 - 31"}


def _write_data(folder: pathlib.Path, rows: int = 200) -> dict[str, str]:
  """Training, validation and prompt files for two adapters; their paths by flag."""

  def twice(split: str, n: int) -> list[dict]:
    questions = [r["messages"][0] for r in outputs.read_jsonl(FOLDER / f"{split}.jsonl")[:n]]
    return [
      {"messages": [q, {"role": "assistant", "content": answer}], "task": name}
      for q in questions
      for name, answer in ANSWERS.items()
    ]

  files = {"train": twice("train", rows), "validation": twice("validation", 20)}
  questions = (FOLDER / "prompts.txt").read_text().splitlines()[:2]
  files["prompts"] = [
    {"prompt": q, "completion": answer, "task": name}
    for q in questions
    for name, answer in ANSWERS.items()
  ]
  paths = {}
  for name, content in files.items():
    paths[name] = folder / f"{name}.jsonl"
    outputs.write_jsonl(paths[name], content)
  return {
    "--train_file": str(paths["train"]),
    "--validation_file": str(paths["validation"]),
    "--generation_prompts_file": str(paths["prompts"]),
  }


def _main(capsys, *argv) -> tuple[int, list[str]]:
  return script_main(capsys, run_clm.main, *argv)


# ---------------------------------------------------------------------------------------------
# The data: rows of one adapter each, and their ids.


def _sequences(lengths, adapters) -> clm_data.Sequences:
  ids = [np.arange(1, n + 1, dtype=np.int32) for n in lengths]
  return clm_data.Sequences(ids, [np.ones(n, np.float32) for n in lengths],
                            adapters=np.array(adapters, np.int32))  # fmt: skip


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_each_row_holds_one_adapter_and_names_it(packed):
  lengths = [5, 3, 4, 2, 6, 1, 3]
  adapters = [0, 1, 0, 1, 2, 2, 0]
  seqs = _sequences(lengths, adapters)
  batcher = clm_data.Batcher(seqs, 8, packed=packed, pad_id=0)
  batch = next(batcher.eval_batches(batcher.rows + 2))  # two empty filler rows at the end
  ids = batch["adapter_ids"]
  assert ids.shape == (batcher.rows + 2,) and ids[-2:].tolist() == [-1, -1]
  seen = []
  for row in range(batcher.rows):  # each sequence of the row is one of the row's adapter's
    for s in range(1, batch["segment_ids"][row].max() + 1):
      n = int((batch["segment_ids"][row] == s).sum())
      members = [i for i, (m, a) in enumerate(zip(lengths, adapters, strict=True))
                 if m == n and a == ids[row] and i not in seen]  # fmt: skip
      assert members, (row, s, n, ids[row])
      seen.append(members[0])
  assert sorted(seen) == list(range(len(lengths)))  # every sequence once
  if packed:  # adapter 0: 5+3, 4; 1: 3+2; 2: 6+1 (all together, 3 rows would hold them)
    assert batcher.rows == 4
  train = next(batcher.train_batches(2, seed=0))
  assert train["adapter_ids"].shape == (2,) and (train["adapter_ids"] >= 0).all()


def test_adapter_names_are_checked_in_one_line():
  names, ids = clm_data.adapter_ids(["x", "y", "x"], None, "task", "t.jsonl")
  assert names == ("x", "y") and ids.tolist() == [0, 1, 0]
  for values, known, message in [
    (["x", "z"], names, "row 1 names the adapter 'z' in column 'task'; the training "
     "split's adapters: x, y"),
    (["x", None], None, "row 1 names the adapter None in column 'task': an adapter name is"),
    (["a/b"], None, "row 0 names the adapter 'a/b'"),
    ([".."], None, "row 0 names the adapter '..'"),
    ([""], None, "row 0 names the adapter ''"),
  ]:  # fmt: skip
    with pytest.raises(ValueError) as e:
      clm_data.adapter_ids(values, known, "task", "t.jsonl")
    assert str(e.value).startswith("t.jsonl: ") and message in str(e.value), str(e.value)


def test_prompts_name_their_adapter(tmp_path):
  file = tmp_path / "p.jsonl"
  file.write_text('{"prompt": "p", "task": "b"}\n{"prompt": "q", "task": "a"}\n')
  prompts, references, ids = clm_sampler.read_prompts(str(file), "task", ("a", "b"))
  assert prompts == ["p", "q"] and references is None and ids.tolist() == [1, 0]
  file.write_text('{"prompt": "p", "task": "c"}\n')
  with pytest.raises(ValueError, match="row 0 names the adapter 'c' in column 'task'; the"):
    clm_sampler.read_prompts(str(file), "task", ("a", "b"))
  text = tmp_path / "p.txt"
  text.write_text("p\n")
  with pytest.raises(ValueError, match="each prompt names its adapter, so the prompts are a"):
    clm_sampler.read_prompts(str(text), "task", ("a", "b"))


def test_what_a_bank_cannot_hold_is_refused_in_one_line(capsys, tmp_path):
  flags = _write_data(tmp_path, rows=8)
  base = ["--config", CONFIG, "--output_dir", str(tmp_path / "out"), "--no-progress",
          "--adapter_column", "task", *[x for kv in flags.items() for x in kv]]  # fmt: skip
  cases = [
    (["--use_dora"], "argument --use_dora: not with --adapter_column: a bank holds plain LoRA"),
    (["--init_lora_weights", "pissa"], "argument --init_lora_weights: not with --adapter_column"),
    (["--export_merged"], "argument --export_merged: not with --adapter_column"),
    (["--adapter_name_or_path", str(tmp_path)], "argument --adapter_name_or_path: not with"),
    (["--adapter_column", "topic"], "train.jsonl' (the train split)"
     " has no such column; its columns: ['messages', 'task']"),
  ]  # fmt: skip
  for extra, message in cases:
    code, err = _main(capsys, *base, *extra)
    assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
  assert not (tmp_path / "out" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Slow: the run.


@pytest.mark.slow
def test_two_adapters_learn_their_own_answers_and_are_written_for_peft(tmp_path, capsys):
  torch = pytest.importorskip("torch", reason="PEFT's side needs the [torch] extra")
  peft = pytest.importorskip("peft", reason="PEFT's side needs the [torch] extra")
  flags = _write_data(tmp_path)
  out = tmp_path / "out"
  code, err = _main(
    capsys, "--config", CONFIG, "--output_dir", str(out), "--no-progress",
    "--adapter_column", "task", "--max_steps", "40", "--eval_steps", "40", "--eval_on_start",
    *[x for kv in flags.items() for x in kv],
  )  # fmt: skip
  assert code == 0, err[-5:]
  results = json.loads((out / "eval_results.json").read_text())
  evals = [r for r in outputs.read_jsonl(out / "metrics.jsonl") if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 40]
  for r in evals:  # the whole is between its two parts (a token-weighted mean of them)
    assert min(r["eval_loss_a"], r["eval_loss_b"]) <= r["eval_loss"]
    assert r["eval_loss"] <= max(r["eval_loss_a"], r["eval_loss_b"])
  assert evals[0]["samples_exact_match"] == 0.0 and results["samples_exact_match"] == 1.0
  assert results["eval_loss_a"] < 0.05 and results["eval_loss_b"] < 0.05
  samples = [s for s in outputs.read_jsonl(out / "samples.jsonl") if s["step"] == 40]
  assert [s["adapter"] for s in samples] == ["a", "b", "a", "b"]
  assert all(s["generation"] == ANSWERS[s["adapter"]] for s in samples), samples

  # each folder, loaded by PEFT on the written base, answers as its adapter did in the run
  tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER)
  base = transformers.AutoModelForCausalLM.from_pretrained(out / "base_model")
  for name in ANSWERS:
    config = json.loads((out / "adapter" / name / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 16
    model = peft.PeftModel.from_pretrained(base, out / "adapter" / name).eval()
    for s in (s for s in samples if s["adapter"] == name):
      ids = clm_data.render(tokenizer, [{"role": "user", "content": s["prompt"]}], True)
      with torch.no_grad():
        tokens = model.generate(
          input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False,
          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids):]  # fmt: skip
      assert tokenizer.decode(tokens, skip_special_tokens=True).strip() == s["generation"], name
    base = model.unload()
