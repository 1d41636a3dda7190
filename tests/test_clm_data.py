"""train/data/clm.py: columns, chat templates and completion masks, truncation, batches; and the
next-token loss over packed rows against padded ones."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import optax
import pytest
import transformers

import lora_jax
from lora_jax import models
from train.data import clm as clm_data
from train.tasks.clm import task as clm_task

QUICKSTART = "configs/clm_quickstart"


@pytest.fixture(scope="module")
def tokenizer():
  return transformers.AutoTokenizer.from_pretrained(QUICKSTART)


def _conversation(*turns):
  return [{"role": role, "content": text} for role, text in turns]


def test_completion_only_weights_only_the_assistant_replies(tokenizer):
  conv = _conversation(
    ("system", "format the date"),
    ("user", "write march 5 , 2021 as a date"),
    ("assistant", "2021 - 03 - 05"),
    ("user", "format the date 1 may 1999"),
    ("assistant", "1999 - 05 - 01"),
  )
  seqs = clm_data.encode_conversations([conv], tokenizer, 64, True, "test")
  tokens = tokenizer.convert_ids_to_tokens(seqs.ids[0].tolist())
  targets = [t for t, w in zip(tokens, seqs.weights[0], strict=True) if w]
  # the replies and their end-of-turn tokens; nothing of the system or user turns
  assert targets == ["2021", "-", "03", "-", "05", "[SEP]", "1999", "-", "05", "-", "01", "[SEP]"]
  everything = clm_data.encode_conversations([conv], tokenizer, 64, False, "test")
  assert everything.weights[0].all() and (everything.ids[0] == seqs.ids[0]).all()


def test_completion_mask_on_smollm2_chat_template(smollm2_path):
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_path)
  conv = _conversation(("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?"),
                       ("assistant", "6"))  # fmt: skip
  seqs = clm_data.encode_conversations([conv], tok, 512, True, "test")
  assert tok.decode(seqs.ids[0][seqs.weights[0] > 0]) == "4<|im_end|>\n6<|im_end|>\n"


def test_text_rows_end_with_eos_and_truncation_is_counted(tokenizer, caplog):
  texts = ["march 5 2021", "write march 5 , 2021 as a date"]
  with caplog.at_level(logging.WARNING):
    seqs = clm_data.encode_text(texts, tokenizer, 6, "the train split")
  assert seqs.ids[0][-1] == tokenizer.eos_token_id and seqs.weights[0].all()
  assert [len(x) for x in seqs.ids] == [5, 6] and seqs.truncated == 1  # [CLS] march 5 2021 [SEP]
  assert "the train split: 1 of 2 examples are longer than max_seq_length=6" in caplog.text


def test_columns_are_picked_or_refused_by_name():
  assert clm_data.pick_column(["text", "messages"], None, None, "f") == ("messages", "messages")
  assert clm_data.pick_column(["text"], None, None, "f") == ("text", "text")
  with pytest.raises(ValueError, match=r"--text_column 'body' is not a column of f; its columns"):
    clm_data.pick_column(["text"], "body", None, "f")
  with pytest.raises(ValueError, match="has neither a 'messages' nor a 'text' column"):
    clm_data.pick_column(["question", "answer"], None, None, "f")


def test_conversations_need_a_chat_template_and_well_formed_turns(tokenizer, tmp_path):
  bare = transformers.AutoTokenizer.from_pretrained(QUICKSTART, chat_template=None)
  bare.chat_template = None
  conv = [_conversation(("user", "hi"), ("assistant", "2021"))]
  with pytest.raises(ValueError, match="has no chat template; use a tokenizer with one"):
    clm_data.encode_conversations(conv, bare, 64, True, "the train split")
  with pytest.raises(ValueError, match="row 0 has a turn .*'role': 'robot'"):
    clm_data.encode_conversations([[{"role": "robot", "content": "x"}]], tokenizer, 64, True, "s")


def test_empty_and_missing_files_are_named(tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(ValueError, match="empty.jsonl' is empty"):
    clm_data.load_raw(train_file=str(tmp_path / "empty.jsonl"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    clm_data.load_raw(train_file=str(tmp_path / "nope.jsonl"))
  with pytest.raises(ValueError, match=r"extension '.xml'; supported"):
    clm_data.load_raw(train_file=str(tmp_path / "data.xml"))


def test_packed_batches_hold_every_sequence_once(tokenizer):
  rows = [json.loads(line) for line in open(f"{QUICKSTART}/train.jsonl")][:50]
  seqs = clm_data.encode_conversations([r["messages"] for r in rows], tokenizer, 64, True, "t")
  packed = clm_data.Batcher(seqs, 64, packed=True, pad_id=0)
  seen = []
  for batch in packed.eval_batches(4):
    for r in range(batch["input_ids"].shape[0]):
      seg = batch["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        seen.append(tuple(batch["input_ids"][r][seg == s]))
  assert sorted(seen) == sorted(tuple(x) for x in seqs.ids)
  assert packed.rows < len(seqs) / 2  # 18-token sequences, 3 to a row of 64


# ---------------------------------------------------------------------------------------------
# The loss: packed rows give the padded rows' loss.


@pytest.fixture(scope="module")
def model():
  """``(apply_fn, trainable, frozen)``: the quickstart's Llama with non-zero adapters."""
  config = transformers.AutoConfig.from_pretrained(QUICKSTART)
  module, variables = models.from_config(config, "causal-lm", rng=0)
  params = lora_jax.lora_init(variables, lora_jax.LoraRule("all-linear", rank=4),
                              rng=jax.random.key(1))  # fmt: skip
  params = jax.tree_util.tree_map_with_path(
    lambda kp, x: x + 0.05 if "lora_b" in str(kp) else x, params
  )
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params))
  return lora_jax.lora_apply(module.apply), trainable, frozen


def _sequences(tokenizer, completion_only: bool, n: int = 24) -> clm_data.Sequences:
  rows = [json.loads(line) for line in open(f"{QUICKSTART}/validation.jsonl")][:n]
  conversations = [r["messages"] for r in rows]
  return clm_data.encode_conversations(conversations, tokenizer, 64, completion_only, "v")


@pytest.mark.parametrize("completion_only", [False, True])
def test_packed_and_padded_batches_give_the_same_loss(tokenizer, model, completion_only):
  """Every token a target (False): a packed row's next sequence must not be predicted from the
  one before it."""
  apply_fn, trainable, frozen = model
  seqs = _sequences(tokenizer, completion_only)
  sums = {}
  for packed in (True, False):
    batcher = clm_data.Batcher(seqs, 64, packed=packed, pad_id=0)
    task = clm_task.CausalLM(apply_fn, batcher, batcher, global_rows=8, eval_rows=8, seed=0)
    step = jax.jit(task.eval_step)
    out = np.concatenate([step(trainable, frozen, b) for b in batcher.eval_batches(24)])
    sums[packed] = out.sum(axis=0)
  assert sums[True][1] == sums[False][1] == sum(w[1:].sum() for w in seqs.weights)
  np.testing.assert_allclose(sums[True][0] / sums[True][1], sums[False][0] / sums[False][1],
                             rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("completion_only", [False, True])
def test_the_loss_over_listed_targets_is_the_whole_next_token_loss(
  tokenizer, model, packed, completion_only, fused
):
  """Outputs at the target positions only give the loss of all logits, masked (the reference:
  every position's next-token loss, weighted by the next token's weight within its sequence),
  whether the loss is fused with the output layer (target_ids=) or taken from logits."""
  apply_fn, trainable, frozen = model
  batch = next(
    clm_data.Batcher(_sequences(tokenizer, completion_only), 64, packed, 0).eval_batches(8)
  )
  ids, seg = batch["input_ids"], batch["segment_ids"]
  logits = apply_fn(
    lora_jax.combine(trainable, frozen), ids, batch["attention_mask"], segment_ids=seg
  )
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
  w = batch["weights"][:, 1:] * ((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0))
  nll_listed = clm_task.forward(apply_fn, trainable, frozen, batch, fused=fused)
  total, weight = clm_task.loss_terms(nll_listed, batch)
  assert float(weight) == w.sum() > 0
  np.testing.assert_allclose(float(total), float((nll * w).sum()), rtol=1e-5)
  k = batch["target_positions"].shape[1]
  if completion_only:  # the answers only: a fraction of the positions get logits
    assert k < ids.shape[1] / 2, (k, ids.shape)


@pytest.mark.parametrize("packed", [False, True])
def test_the_train_stream_is_seeded_resumable_and_covers_each_epoch_once(tokenizer, packed):
  """Which batch a step sees: each epoch every row once (the partial last batch dropped), a
  fresh order each epoch and seed, and a resumed stream (``start``) continues the same one."""
  rows = [json.loads(line) for line in open(f"{QUICKSTART}/train.jsonl")][:60]
  seqs = clm_data.encode_conversations([r["messages"] for r in rows], tokenizer, 64, True, "t")
  batcher = clm_data.Batcher(seqs, 64, packed=packed, pad_id=0)
  n_rows = 4
  per_epoch = batcher.rows // n_rows

  def key(batch):  # a batch's content, whatever its padded length
    rows = zip(batch["input_ids"], batch["attention_mask"], strict=True)
    return tuple(tuple(r[m > 0]) for r, m in rows)

  stream = batcher.train_batches(n_rows, seed=3)
  whole = [key(next(stream)) for _ in range(3 * per_epoch)]
  resumed = batcher.train_batches(n_rows, seed=3, start=per_epoch + 1)
  assert [key(next(resumed)) for _ in range(per_epoch)] == whole[per_epoch + 1 : 2 * per_epoch + 1]
  everything = {row for u in range(batcher.rows) for row in key(batcher.batch(np.array([u]), 1))}
  for e in range(3):
    epoch = [row for batch in whole[e * per_epoch : (e + 1) * per_epoch] for row in batch]
    assert len(set(epoch)) == len(epoch) == per_epoch * n_rows  # no row twice in an epoch
    assert set(epoch) <= everything
  assert whole[:per_epoch] != whole[per_epoch : 2 * per_epoch]  # another order each epoch
  other = batcher.train_batches(n_rows, seed=4)
  assert [key(next(other)) for _ in range(per_epoch)] != whole[:per_epoch]
