"""The training machinery (train/engine/) and train/tasks/glue/pipeline.py on a tiny
random BERT and a few dozen SST-2 rows.

* the three parallel modes (jit, pmap, mesh with replicated or sharded frozen weights) give the
  same losses on the 8 fake CPU devices;
* gradient accumulation of 2 x 4 rows equals one step of 8 rows;
* a run interrupted after a checkpoint and rerun reproduces the uninterrupted run, and its
  exported PEFT adapter starts a new run where it ended;
* a checkpoint from another LoRA shape is refused, naming the differences.
"""

from __future__ import annotations

import collections
import pathlib

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import save_file

import lora_jax
from lora_jax import models
from train.data import glue as glue_data
from train.engine import checkpoints
from train.engine import outputs
from train.engine import parallel
from train.tasks import setup
from train.tasks.glue import args as glue_args
from train.tasks.glue import pipeline as glue_train
from train.tasks.glue import task as glue_task

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_bert(folder: pathlib.Path, sst2_dir: pathlib.Path, dropout: float) -> pathlib.Path:
  """A random 2-layer BERT (hidden 32) + a WordPiece tokenizer over SST-2's frequent words.

  The embedding table has BERT's 30,522 rows (the tokenizer uses the first ~400), so that, as
  for real checkpoints, the frozen base is most of the bytes: 3.9 MB here."""
  folder.mkdir(parents=True, exist_ok=True)
  lines = (sst2_dir / "train.tsv").read_text().splitlines()[1:400]
  words = collections.Counter(w for line in lines for w in line.split("\t")[0].split())
  vocab = SPECIAL + [w for w, _ in words.most_common(400) if w not in SPECIAL]
  tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
  tokenizer.save_pretrained(folder)
  config = transformers.BertConfig(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=dropout,
  )
  config.save_pretrained(folder)
  variables = models.auto_model(config).init(jax.random.key(0), np.ones((1, 4), np.int32))
  save_file(models.flax_to_hf(variables, config), str(folder / "model.safetensors"))
  return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, sst2_dir):
  return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), sst2_dir, dropout=0.1)


@pytest.fixture(scope="module")
def tiny_bert_no_dropout(tmp_path_factory, sst2_dir):
  return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert_nd"), sst2_dir, dropout=0.0)


def run_args(model, sst2_dir, output_dir, *extra) -> glue_args.argparse.Namespace:
  return glue_args.parse_args(
    [
      "--model_name_or_path",
      str(model),
      "--train_file",
      str(sst2_dir / "train.tsv"),
      "--validation_file",
      str(sst2_dir / "validation.tsv"),
      "--max_train_samples",
      "64",
      "--max_eval_samples",
      "32",
      "--max_seq_length",
      "16",  # one bucket: one compilation per step function
      "--per_device_train_batch_size",
      "8",
      "--per_device_eval_batch_size",
      "16",
      "--lora_r",
      "4",
      "--logging_steps",
      "1",
      "--output_dir",
      str(output_dir),
      "--no-progress",
      *extra,
    ]
  )


def logged_run(model, sst2_dir, out: pathlib.Path, mode: str, *extra) -> tuple[list, dict]:
  """``run_glue``'s ``train_and_evaluate`` in ``mode`` with a global batch of 8: the losses of
  every logged step and the final eval results."""
  per_device = 8 if mode == "none" else 8 // jax.device_count()
  args = run_args(
    model,
    sst2_dir,
    out,
    "--parallel",
    mode,
    "--per_device_train_batch_size",
    str(per_device),
    "--per_device_eval_batch_size",
    str(16 if mode == "none" else 16 // jax.device_count()),
    "--learning_rate",
    "1e-2",
    "--save_steps",
    "0",
    *extra,
  )
  results = glue_train.train_and_evaluate(args)
  return train_losses(out), results


@pytest.mark.slow
def test_parallel_modes_give_the_same_losses(tiny_bert, tiny_bert_no_dropout, sst2_dir, tmp_path):
  """The issue's check: 12 logged steps in each mode, losses within 2e-3 relative. Without
  dropout the modes, and packed or padded batches, compute the same function. With dropout on,
  padded ``mesh`` still matches ``none`` (partitionable threefry draws the same mask whatever
  the sharding); a ``pmap`` device draws its own, and packing lays rows out per device."""
  assert jax.device_count() == 8, "tests/conftest.py should provide 8 fake CPU devices"
  steps = ("--max_steps", "12", "--lora_dropout", "0")
  ref, ref_results = logged_run(tiny_bert_no_dropout, sst2_dir, tmp_path / "none", "none", *steps)
  assert [s for s, _ in ref] == list(range(1, 13))
  variants = (  # packed batches by default (one packing group per device); padded rows too
    ("pmap", ()),
    ("mesh", ()),
    ("mesh", ("--shard_frozen",)),
    ("none", ("--no-pack_sequences",)),
    ("mesh", ("--no-pack_sequences",)),
  )
  for mode, flags in variants:
    out = tmp_path / "_".join((mode, *(f.strip("-") for f in flags)))
    losses, results = logged_run(tiny_bert_no_dropout, sst2_dir, out, mode, *steps, *flags)
    assert [s for s, _ in losses] == list(range(1, 13)), mode
    np.testing.assert_allclose(
      [x for _, x in losses], [x for _, x in ref], rtol=2e-3, err_msg=f"{mode} {flags}"
    )
    assert results["eval_loss"] == pytest.approx(ref_results["eval_loss"], rel=2e-3), mode
  dropout = ("--max_steps", "12", "--lora_dropout", "0.1", "--no-pack_sequences")
  ref, _ = logged_run(tiny_bert, sst2_dir, tmp_path / "none_dropout", "none", *dropout)
  mesh, _ = logged_run(tiny_bert, sst2_dir, tmp_path / "mesh_dropout", "mesh", *dropout)
  np.testing.assert_allclose([x for _, x in mesh], [x for _, x in ref], rtol=2e-3)


def test_fsdp_spec_shards_the_largest_divisible_axis():
  big = jax.ShapeDtypeStruct((100, 1024), np.float32)
  assert parallel._fsdp_spec(big, 8) == parallel.P(None, "data")
  assert parallel._fsdp_spec(jax.ShapeDtypeStruct((32,), np.float32), 8) == parallel.P()


def final_state(output_dir: pathlib.Path) -> dict:
  """The last checkpoint's trainable leaves and step, read back with Orbax."""
  import orbax.checkpoint as ocp

  mngr = ocp.CheckpointManager(output_dir / "checkpoints", item_names=("state", "meta"))
  got = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return got["state"]


def train_losses(output_dir: pathlib.Path) -> list[tuple[int, float]]:
  rows = outputs.read_jsonl(output_dir / outputs.METRICS)
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.slow
def test_accumulation_matches_a_bigger_batch(tiny_bert_no_dropout, sst2_dir, tmp_path):
  common = ("--max_steps", "2", "--lora_dropout", "0", "--save_steps", "0")
  one = run_args(tiny_bert_no_dropout, sst2_dir, tmp_path / "one", *common)
  two = run_args(
    tiny_bert_no_dropout,
    sst2_dir,
    tmp_path / "two",
    *common,
    "--per_device_train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "2",
  )
  glue_train.train_and_evaluate(one)
  glue_train.train_and_evaluate(two)
  a, b = final_state(tmp_path / "one"), final_state(tmp_path / "two")
  for key in a["trainable"]:
    np.testing.assert_allclose(a["trainable"][key], b["trainable"][key], atol=1e-5, err_msg=key)
  np.testing.assert_allclose(
    [x for _, x in train_losses(tmp_path / "one")],
    [x for _, x in train_losses(tmp_path / "two")],
    atol=1e-5,
  )


@pytest.mark.slow
def test_bfloat16_training_and_merged_export(tiny_bert_no_dropout, sst2_dir, tmp_path):
  """--dtype bfloat16 trains (bf16 compute, float32 adapters and optimizer) to about the
  float32 run's losses, and --export_merged writes a transformers model that gives the logits
  of the adapter the run saved (both evaluated in float32)."""
  import torch

  common = ("--max_steps", "4", "--lora_dropout", "0", "--save_steps", "0",
            "--learning_rate", "1e-2")  # fmt: skip
  f32 = run_args(tiny_bert_no_dropout, sst2_dir, tmp_path / "f32", *common)
  bf16 = run_args(tiny_bert_no_dropout, sst2_dir, tmp_path / "bf16", *common, "--dtype",
                  "bfloat16", "--export_merged")  # fmt: skip
  results = glue_train.train_and_evaluate(bf16)
  f32_results = glue_train.train_and_evaluate(f32)
  losses = [x for _, x in train_losses(tmp_path / "bf16")]
  assert np.isfinite(losses).all() and np.isfinite(results["eval_loss"])
  np.testing.assert_allclose(losses, [x for _, x in train_losses(tmp_path / "f32")], rtol=3e-2)
  assert results["eval_loss"] == pytest.approx(f32_results["eval_loss"], rel=3e-2)

  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_no_dropout)
  sentences = [line.split("\t")[0] for line in
               (sst2_dir / "validation.tsv").read_text().splitlines()[1:9]]  # fmt: skip
  batch = tokenizer(sentences, padding=True, truncation=True, max_length=16, return_tensors="np")
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16/merged")
  with torch.no_grad():
    theirs = merged.eval()(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  config = transformers.AutoConfig.from_pretrained(tiny_bert_no_dropout, num_labels=2)
  # the checkpoint has no pooler: the run drew it from --seed, and so does this reference
  module, base = models.from_pretrained(
    tiny_bert_no_dropout, "sequence-classification", num_labels=2, rng=bf16.seed
  )
  params = lora_jax.import_peft(tmp_path / "bf16" / "adapter", base, config=config)
  ours = lora_jax.lora_apply(module.apply)(
    params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  )
  np.testing.assert_allclose(theirs, ours, atol=1e-4)


def check_outputs(out: pathlib.Path, results: dict):
  """What a 20-step run with evaluations at 10 and 20 and --do_predict leaves behind."""
  assert set(results) >= {"step", "eval_accuracy", "eval_loss"} and results["step"] == 20
  rows = outputs.read_jsonl(out / outputs.METRICS)
  train_rows = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, 21))
  assert set(train_rows[0]) >= {"step", "loss", "learning_rate", "examples_per_s"}
  assert [r["step"] for r in rows if "eval_accuracy" in r] == [10, 20]
  assert outputs.read_jsonl(out / outputs.METRICS)[-1]["eval_accuracy"] == results["eval_accuracy"]
  assert (out / outputs.CURVES).stat().st_size > 1000
  lines = (out / "predict_results.tsv").read_text().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 21
  assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}


def check_restart_from_adapter(model, sst2_dir, tmp_path, results: dict):
  """--adapter_name_or_path with the run's PEFT export: one step at learning rate 0 (the
  warmup's first) evaluates like the run that wrote it."""
  assert (tmp_path / "whole" / "adapter" / "adapter_config.json").exists()
  again = run_args(
    model,
    sst2_dir,
    tmp_path / "again",
    "--max_steps",
    "1",
    "--adapter_name_or_path",
    str(tmp_path / "whole" / "adapter"),
  )
  loaded = glue_train.train_and_evaluate(again)
  assert loaded["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-5)
  assert loaded["eval_accuracy"] == results["eval_accuracy"]


class Crash(Exception):
  pass


def folder_bytes(folder: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tiny_bert, sst2_dir, tmp_path):
  """The issue's check: 20 steps straight, and 10 steps + a rerun to 20 (hidden and LoRA
  dropout on, so the rng must resume too), give the same step-20 loss within 1e-5. 64 rows / 8
  = 8 batches per epoch, so the runs also cross epoch boundaries. The crash comes at step 12,
  after the step-10 checkpoint: the rerun drops the two logged steps past it."""
  common = ("--max_steps", "20", "--save_steps", "10", "--eval_steps", "10")
  common += ("--lora_dropout", "0.1")
  predict = (
    "--test_file",
    str(sst2_dir / "test.tsv"),
    "--do_predict",
    "--max_predict_samples",
    "20",
  )
  whole = run_args(tiny_bert, sst2_dir, tmp_path / "whole", *common, *predict)
  results = glue_train.train_and_evaluate(whole)
  check_outputs(tmp_path / "whole", results)
  check_restart_from_adapter(tiny_bert, sst2_dir, tmp_path, results)

  parts = run_args(tiny_bert, sst2_dir, tmp_path / "parts", *common)

  def crash(step):
    if step == 12:
      raise Crash

  with pytest.raises(Crash):
    glue_train.train_and_evaluate(parts, on_step=crash)
  assert final_state(tmp_path / "parts")["step"] == 10  # micro-batches = steps here
  resumed = glue_train.train_and_evaluate(parts)

  whole_losses, part_losses = train_losses(tmp_path / "whole"), train_losses(tmp_path / "parts")
  assert [s for s, _ in part_losses] == list(range(1, 21))  # the crashed tail was dropped
  assert part_losses[-1][1] == pytest.approx(whole_losses[-1][1], abs=1e-5)  # step 20
  np.testing.assert_allclose(
    [x for _, x in part_losses], [x for _, x in whole_losses], rtol=1e-6, atol=1e-6
  )
  a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "parts")
  assert int(a["step"]) == int(b["step"]) == 20
  for key in a["trainable"]:
    np.testing.assert_allclose(a["trainable"][key], b["trainable"][key], atol=1e-6, err_msg=key)
  assert resumed["eval_accuracy"] == pytest.approx(results["eval_accuracy"])
  assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == ["10", "20"]
  # Checkpoints, adapter, logs and plots together: far smaller than the frozen base they adapt.
  base = (tiny_bert / "model.safetensors").stat().st_size
  assert folder_bytes(tmp_path / "parts") < base / 10, (folder_bytes(tmp_path / "parts"), base)


def test_checkpoint_of_another_model_or_lora_shape_is_refused(
  tiny_bert, tiny_bert_no_dropout, sst2_dir, tmp_path
):
  glue_train.train_and_evaluate(
    run_args(tiny_bert_no_dropout, sst2_dir, tmp_path, "--max_steps", "1", "--lora_dropout", "0")
  )
  other_rank = run_args(
    tiny_bert_no_dropout, sst2_dir, tmp_path, "--max_steps", "2", "--lora_r", "2"
  )
  with pytest.raises(checkpoints.CheckpointMismatch) as e:
    glue_train.train_and_evaluate(other_rank)
  message = str(e.value)
  assert (
    "refusing to resume" in message
    and "lora: checkpoint '4 x r=4 alpha=16.0 rslora=False dropout=0.0', this run '4 x r=2"
    in message
  )
  assert (
    "layer/1/attention/self/value/lora_b: checkpoint float32[4, 32], this run float32[2, 32]"
    in (message)
  )
  other_model = run_args(tiny_bert, sst2_dir, tmp_path, "--max_steps", "2")  # same shapes
  with pytest.raises(checkpoints.CheckpointMismatch, match="model_name_or_path: checkpoint"):
    glue_train.train_and_evaluate(other_model)


@pytest.mark.slow
def test_adapter_with_another_head_starts_a_task_with_ignore_mismatched_sizes(
  tiny_bert_no_dropout, sst2_dir, tmp_path
):
  """As the LoRA paper starts RTE from MNLI: an SST-2 adapter (2-label head) starts an STS-B
  run (regression, 1 output). Refused by default; with the flag its LoRA factors load and the
  regression head is new."""
  glue_train.train_and_evaluate(
    run_args(tiny_bert_no_dropout, sst2_dir, tmp_path / "sst2", "--max_steps", "2")
  )
  rows = [r.split("\t") for r in (sst2_dir / "train.tsv").read_text().splitlines()[1:41]]
  stsb = ["sentence1\tsentence2\tlabel"] + [f"{a}\t{a}\t{4.0 * int(y):.1f}" for a, y in rows]
  for name in ("train.tsv", "validation.tsv"):
    (tmp_path / name).write_text("\n".join(stsb) + "\n")

  def stsb_args(*extra):
    args = run_args(tiny_bert_no_dropout, sst2_dir, tmp_path / "stsb", "--max_steps", "1", *extra)
    args.task_name, args.train_file = "stsb", str(tmp_path / "train.tsv")
    args.validation_file = str(tmp_path / "validation.tsv")
    return args

  start = ("--adapter_name_or_path", str(tmp_path / "sst2" / "adapter"))
  with pytest.raises(ValueError, match=r"classifier/kernel: saved with shape \(32, 2\)"):
    glue_train.load_model(stsb_args(*start), glue_data.TASKS["stsb"])
  _, params, _ = glue_train.load_model(
    stsb_args(*start, "--ignore_mismatched_sizes"), glue_data.TASKS["stsb"]
  )
  assert params["params"]["classifier"]["kernel"].shape == (32, 1)
  saved = lora_jax.import_peft(
    tmp_path / "sst2" / "adapter",
    glue_train.load_model(
      run_args(tiny_bert_no_dropout, sst2_dir, tmp_path / "x"), glue_data.TASKS["sst2"]
    )[1],
    config=transformers.AutoConfig.from_pretrained(tiny_bert_no_dropout),
  )
  query = ("encoder", "layer", "1", "attention", "self", "query", "lora_b")
  got, want = params["params"], saved["params"]
  for key in query:
    got, want = got[key], want[key]
  np.testing.assert_array_equal(got, want)
  assert np.abs(np.asarray(want)).max() > 0  # trained: B left zero
  results = glue_train.train_and_evaluate(stsb_args(*start, "--ignore_mismatched_sizes"))
  assert "eval_pearson" in results


def test_our_adapter_format_is_read_with_load_adapter(tiny_bert_no_dropout, sst2_dir, tmp_path):
  args = run_args(tiny_bert_no_dropout, sst2_dir, tmp_path)
  task = glue_data.TASKS["sst2"]
  _, params, config = glue_train.load_model(args, task)
  folder = lora_jax.save_adapter(
    tmp_path / "ours", params, extra_trainable=glue_train.EXTRA_TRAINABLE
  )
  base = models.from_pretrained(tiny_bert_no_dropout, "sequence-classification", num_labels=2)[1]
  loaded = setup.load_adapter(str(folder), base, config)
  assert setup.adapter_summary(loaded) == setup.adapter_summary(params)
  assert setup.adapter_summary(params) == "4 x r=4 alpha=16.0 rslora=False dropout=0.1"


def test_loss_fn_weights_and_regression():
  logits = np.array([[0.0, 1.0], [2.0, 0.0], [5.0, -5.0]], np.float32)
  labels = np.array([1, 0, 1])
  full = glue_task.loss_fn(logits[:2], labels[:2], np.ones(2, np.float32), False)
  masked = glue_task.loss_fn(logits, labels, np.array([1, 1, 0], np.float32), False)
  np.testing.assert_allclose(full, masked, rtol=1e-6)
  mse = glue_task.loss_fn(np.array([[1.0], [3.0]]), np.array([0.0, 1.0]), np.ones(2), True)
  np.testing.assert_allclose(mse, 2.5)


def test_distributed_initialize_only_for_multi_process_jobs(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  waits = []
  monkeypatch.setattr(parallel, "wait_for_coordinator", lambda *a: waits.append(a))
  assert not parallel.maybe_initialize_distributed({})
  assert not parallel.maybe_initialize_distributed({"SLURM_NTASKS": "1"})
  assert calls == []
  env = {
    "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": "1",
  }
  assert parallel.maybe_initialize_distributed(env, timeout=7)
  assert parallel.maybe_initialize_distributed({"SLURM_NTASKS": "4"})
  assert parallel.maybe_initialize_distributed({**env, "JAX_PROCESS_ID": "0"})
  # JAX's heartbeat timeout past the peer watch's (--distributed_timeout): its line comes first
  beat = {7: {"heartbeat_timeout_seconds": 24}, 300: {"heartbeat_timeout_seconds": 610}}
  assert calls == [
    {"initialization_timeout": 7, **beat[7], "num_processes": 2, "process_id": 1},
    {"initialization_timeout": 300, **beat[300]},
    {"initialization_timeout": 300, **beat[300], "num_processes": 2, "process_id": 0},
  ]
  assert waits == [("10.0.0.1:1234", 7)]  # process 0 is the coordinator: it waits for no one


def test_loraplus_flag_moves_b_by_the_ratio(tiny_bert_no_dropout, sst2_dir, tmp_path):
  """``--loraplus_lr_ratio 16``: after one AdamW step from the same start (B = 0, so weight
  decay has nothing to act on yet), every B moved 16 times as far and every A as far."""
  common = ("--max_steps", "1", "--learning_rate", "1e-3", "--warmup_ratio", "0")
  plain, plus = tmp_path / "plain", tmp_path / "plus"
  glue_train.train_and_evaluate(run_args(tiny_bert_no_dropout, sst2_dir, plain, *common))
  glue_train.train_and_evaluate(
    run_args(tiny_bert_no_dropout, sst2_dir, plus, *common, "--loraplus_lr_ratio", "16")
  )
  args = run_args(tiny_bert_no_dropout, sst2_dir, tmp_path / "start")
  _, start, _ = glue_train.load_model(args, glue_data.TASKS["sst2"])
  mask = lora_jax.trainable_mask(start, glue_train.EXTRA_TRAINABLE)
  trainable = lora_jax.partition(start, mask)[0]
  first = {k.replace("/", "."): v for k, v in checkpoints._leaf_paths(trainable).items()}
  a, b = final_state(plain)["trainable"], final_state(plus)["trainable"]
  lora_b = [k for k in a if k.endswith("lora_b")]
  assert lora_b and all(np.abs(a[k]).max() > 0 for k in lora_b)
  for key in a:
    moved_plain, moved_plus = a[key] - np.asarray(first[key]), b[key] - np.asarray(first[key])
    ratio = 16.0 if key.endswith("lora_b") else 1.0
    np.testing.assert_allclose(moved_plus, ratio * moved_plain, rtol=1e-5, atol=1e-8, err_msg=key)


@pytest.mark.parametrize("choice,implementation", [("auto", None), ("pallas", "pallas")])
def test_attn_implementation_reaches_the_encoder(
  tiny_bert, sst2_dir, tmp_path, choice, implementation
):
  args = run_args(tiny_bert, sst2_dir, tmp_path, "--attn_implementation", choice)
  module, _, _ = glue_train.load_model(args, glue_data.TASKS["sst2"])
  assert module.attention_implementation == implementation
