"""train/run_clm.py end to end on the offline quickstart (a from-scratch Llama, synthetic dates):
outputs, one-line errors for bad input, and (slow, run by .ci/run) the parallel modes and a
SIGKILL-ed run resumed by rerunning its command."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import transformers
from conftest import REPO
from conftest import one_device_env
from helpers import script_main

from configs.tools import make_clm_quickstart
from configs.tools import make_dates_recipe
from train import run_clm
from train import run_glue
from train.engine import outputs
from train.tasks.clm import args as clm_args
from train.tasks.clm import pipeline as clm_train
from train.tasks.clm import sampler as clm_sampler

CONFIG = str(REPO / "configs" / "clm_quickstart.yaml")
FOLDER = REPO / "configs" / "clm_quickstart"


@pytest.fixture(autouse=True)
def _elsewhere(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # the config's paths are relative to its folder, not to the cwd


def _args(out, *extra):
  return clm_args.parse_args(
    ["--config", CONFIG, "--output_dir", str(out), "--no-progress", *extra]
  )


@pytest.mark.parametrize(
  ("write", "folder"),
  [
    (make_clm_quickstart.write, FOLDER),
    (make_dates_recipe.write, REPO / "configs" / "smollm2_dates"),
  ],
  ids=["quickstart", "smollm2_dates"],
)
def test_generators_reproduce_the_committed_files(tmp_path, write, folder):
  write(tmp_path)
  committed = sorted(p.name for p in folder.iterdir())
  assert sorted(p.name for p in tmp_path.iterdir()) == committed
  for name in committed:
    assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
  assert sum((folder / n).stat().st_size for n in committed) < 500_000  # commit-sized


def test_the_recipe_splits_share_no_date():
  folder = REPO / "configs" / "smollm2_dates"
  answers = {}
  for split in ("train", "validation", "test"):
    rows = outputs.read_jsonl(folder / f"{split}.jsonl")
    answers[split] = {
      r["completion"] if split == "test" else r["messages"][1]["content"] for r in rows
    }
    assert len(answers[split]) == len(rows), split  # and no date twice within a split
  assert not answers["train"] & answers["validation"]
  assert not (answers["train"] | answers["validation"]) & answers["test"]


ANSWERS = ["1997 - 06 - 08", "1991 - 05 - 27", "2009 - 04 - 25", "2015 - 11 - 14"]  # prompts.txt's


# an on_step hook's sleep at step 1; half of it is well above the loop's unlogged seconds (the
# final checkpoint: 2.3 s on a loaded 2-core machine)
HOOK_S = 10.0


@pytest.mark.slow
def test_the_quickstart_writes_every_output_and_its_samples_come_out_right(tmp_path):
  prompts = (FOLDER / "prompts.txt").read_text().splitlines()
  file = tmp_path / "prompts.jsonl"  # prompts.txt with the answers: samples get scored
  rows = [{"prompt": p, "completion": a} for p, a in zip(prompts, ANSWERS, strict=True)]
  file.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "run"
  results = clm_train.train_and_evaluate(
    _args(out, "--eval_steps", "200", "--eval_on_start", "--generation_prompts_file", str(file)),
    on_step=lambda step: time.sleep(HOOK_S if step == 1 else 0),  # not training time
  )
  assert results["step"] == 400 and results["perplexity"] == pytest.approx(
    np.exp(results["eval_loss"])
  )
  rows = outputs.read_jsonl(out / "metrics.jsonl")
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(25, 401, 25))
  assert set(train_rows[0]) >= {"loss", "learning_rate", "grad_norm", "tokens_per_s"}
  logged_s = sum(r["s_per_step"] * 25 for r in train_rows)
  assert results["train_runtime_s"] < logged_s + HOOK_S / 2, (results, logged_s)
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 200, 400]
  assert evals[0]["eval_loss"] > evals[1]["eval_loss"] > evals[2]["eval_loss"]  # it falls
  samples = outputs.read_jsonl(out / "samples.jsonl")
  assert [s["step"] for s in samples] == [0] * 4 + [200] * 4 + [400] * 4
  assert [s["prompt"] for s in samples[-4:]] == prompts
  for s, answer in zip(samples, ANSWERS * 3, strict=True):
    assert s["completion"] == answer and s["exact_match"] == (s["generation"] == answer)
  for r in evals:  # the score is the mean of the rows' own matches
    matches = [s["exact_match"] for s in samples if s["step"] == r["step"]]
    assert r["samples_exact_match"] == np.mean(matches)
  # the untrained model gets none right; the trained one all four
  assert evals[0]["samples_exact_match"] == 0.0 and results["samples_exact_match"] == 1.0
  config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert config["task_type"] == "CAUSAL_LM" and config["r"] == 16
  assert (out / "base_model" / "model.safetensors").is_file()  # the random base it applies to
  for name in ("eval_results.json", "curves.png", "args.json"):
    assert (out / name).is_file(), name
  assert (out / "checkpoints" / "400").is_dir()


def test_a_prompts_file_with_completions_on_some_rows_is_refused(tmp_path):
  file = tmp_path / "p.jsonl"
  file.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
  with pytest.raises(ValueError, match="some rows have a 'completion' and some do not"):
    clm_sampler.read_prompts(str(file))


def _main(capsys, *argv) -> tuple[int, list[str]]:
  return script_main(capsys, run_clm.main, *argv)


@pytest.mark.parametrize("script", [run_clm, run_glue], ids=["run_clm", "run_glue"])
def test_help_lists_the_flags(capsys, script):
  with pytest.raises(SystemExit) as exit_:
    script.main(["--help"])
  out = capsys.readouterr().out
  assert exit_.value.code == 0 and out.startswith("usage: "), out[-300:]
  assert "--lora_target_modules" in out and "--max_seq_length" in out


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  bare = tmp_path / "no_template"
  shutil.copytree(FOLDER, bare)
  tokenizer_config = json.loads((bare / "tokenizer_config.json").read_text())
  del tokenizer_config["chat_template"]
  (bare / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  evil = tmp_path / "evil_template"  # a chat template reaching out of jinja's sandbox
  shutil.copytree(FOLDER, evil)
  tokenizer_config["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
  (evil / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  out = ["--output_dir", str(tmp_path / "out"), "--no-progress"]
  cases = [
    (["--text_column", "body"], "--text_column 'body' is not a column of"),
    (["--tokenizer_name", str(evil)], "access to attribute '__class__' of 'list' object is unsafe"),
    (["--train_file", str(tmp_path / "empty.jsonl")], "empty.jsonl' is empty"),
    (["--tokenizer_name", str(bare)], "has no chat template; use a tokenizer with one"),
    (["--lr_scheduler_type", "warmup_stable"], "invalid choice: 'warmup_stable'"),
    (
      ["--attn_implementation", "flash"],
      "invalid choice: 'flash' (choose from 'auto', 'xla', 'xla_chunked'",
    ),
  ]
  for extra, message in cases:
    code, err = _main(capsys, "--config", CONFIG, *out, *extra)
    assert code == 2 and len(err) == 1 and message in err[0], (extra, err)
    assert err[0].startswith("run_clm.py: error: "), err


@pytest.mark.parametrize("choice,implementation", [("auto", None), ("xla_chunked", "xla_chunked")])
def test_attn_implementation_reaches_the_model(tmp_path, choice, implementation):
  args = _args(tmp_path / "out", "--attn_implementation", choice)
  module, _, _ = clm_train.load_model(args)
  assert module.attention_implementation == implementation


@pytest.mark.slow  # a whole run (~12 s)
def test_examples_longer_than_max_seq_length_are_truncated_and_counted(tmp_path, caplog):
  args = _args(tmp_path / "out", "--max_seq_length", "12", "--max_steps", "1",
               "--max_train_samples", "64", "--generation_prompts_file", "")  # fmt: skip
  with caplog.at_level("WARNING"):
    clm_train.train_and_evaluate(args)
  assert "train.jsonl' (the train split): 64 of 64 examples are longer than max_seq_length=12 " in (
    caplog.text
  )


# ---------------------------------------------------------------------------------------------
# Slow: parallel modes, and a run killed with SIGKILL.


def _losses(out: pathlib.Path) -> list[float]:
  return [r["loss"] for r in outputs.read_jsonl(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_parallel_modes_give_the_same_losses(tmp_path):
  """12 logged steps of 8 packed rows, dropout off, on 8 fake devices (1 row each)."""
  assert jax.device_count() == 8
  common = ("--max_steps", "12", "--logging_steps", "1", "--eval_steps", "0",
            "--lora_dropout", "0", "--per_device_eval_batch_size", "8")  # fmt: skip
  ref_results = clm_train.train_and_evaluate(
    _args(tmp_path / "none", *common, "--per_device_train_batch_size", "8")
  )
  ref = _losses(tmp_path / "none")
  assert len(ref) == 12
  for mode, flags in (("pmap", ()), ("mesh", ()), ("mesh", ("--shard_frozen",))):
    out = tmp_path / f"{mode}{len(flags)}"
    results = clm_train.train_and_evaluate(
      _args(
        out,
        *common,
        "--parallel",
        mode,
        "--per_device_train_batch_size",
        "1",
        "--per_device_eval_batch_size",
        "1",
        *flags,
      )  # fmt: skip
    )
    np.testing.assert_allclose(_losses(out), ref, rtol=2e-3, err_msg=f"{mode} {flags}")
    assert results["eval_loss"] == pytest.approx(ref_results["eval_loss"], rel=2e-3)


def _write_base(folder: pathlib.Path) -> pathlib.Path:
  """A random 'pretrained' checkpoint of the quickstart's shape, with its tokenizer."""
  from lora_jax import models

  config = transformers.AutoConfig.from_pretrained(FOLDER)
  _, variables = models.from_config(config, "causal-lm", rng=3)
  models.export_merged(folder, variables, config=config,
                       tokenizer=transformers.AutoTokenizer.from_pretrained(FOLDER))  # fmt: skip
  return folder


@pytest.mark.slow
def test_a_run_killed_after_its_first_checkpoint_resumes_to_the_same_loss(tmp_path):
  base = _write_base(tmp_path / "base")
  argv = [sys.executable, str(REPO / "train" / "run_clm.py"), "--config", CONFIG,
          "--config_name", "", "--model_name_or_path", str(base), "--max_steps", "16",
          "--save_steps", "4", "--eval_steps", "0", "--logging_steps", "1",
          "--lora_dropout", "0.1", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
          "--generation_prompts_file", "", "--no-progress"]  # fmt: skip
  env = one_device_env()
  straight = subprocess.run([*argv, "--output_dir", str(tmp_path / "straight")], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
  assert straight.returncode == 0, straight.stderr[-2000:]
  resumed = [*argv, "--output_dir", str(tmp_path / "resumed")]
  proc = subprocess.Popen(resumed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = tmp_path / "resumed" / "checkpoints" / "4"
  deadline = time.time() + 300
  while not first.is_dir() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert first.is_dir(), "the run never wrote its first checkpoint"
  steps = [r["step"] for r in outputs.read_jsonl(tmp_path / "resumed" / "metrics.jsonl")]
  assert max(steps) < 16, "the run was not killed before the end"
  again = subprocess.run(resumed, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resuming from" in again.stderr
  np.testing.assert_allclose(_losses(tmp_path / "resumed"), _losses(tmp_path / "straight"),
                             rtol=1e-5)  # fmt: skip
  # nothing of the frozen base is written: checkpoints and adapter are a fraction of it
  written = sum(f.stat().st_size for f in (tmp_path / "resumed").rglob("*") if f.is_file())
  assert written < (base / "model.safetensors").stat().st_size / 4


@pytest.mark.slow
def test_pallas_attention_trains_as_xla_on_packed_rows(tmp_path):
  """The quickstart's packed batches through Pallas's kernel (interpreted on CPU): the segment
  ids reach it from the batches, and the losses are XLA's."""
  losses = {}
  for impl in ("xla", "pallas_interpret"):
    out = tmp_path / impl
    flags = ["--attn_implementation", impl, "--max_steps", "3", "--logging_steps", "1",
             "--eval_steps", "0", "--generation_prompts_file", ""]  # fmt: skip
    clm_train.train_and_evaluate(_args(out, *flags))
    losses[impl] = [r["loss"] for r in outputs.read_jsonl(out / "metrics.jsonl") if "loss" in r]
  assert len(losses["xla"]) == 3
  np.testing.assert_allclose(losses["pallas_interpret"], losses["xla"], rtol=1e-5)
