"""train/data/packing.py and the model's packed rows: a packed batch gives the padded batch's logits
and gradients, for BERT and RoBERTa, on one group or several (data-parallel shards)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import lora_jax
from lora_jax import models
from train.data import batching
from train.data import packing
from train.tasks.glue import task as glue_task

PAD = 1


def row_counts(size: int, groups: int) -> tuple[int, ...]:
  return batching.bucket_lengths(size // groups, smallest=1)  # as glue_data.batch_for


def test_first_fit_decreasing_places_every_sequence_once():
  rng = np.random.default_rng(0)
  for _ in range(20):
    lengths = rng.integers(1, 17, rng.integers(1, 40))
    rows = packing.first_fit_decreasing(lengths, 16)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert len(rows) <= len(lengths)
    # first fit: no two rows could have been one
    loads = sorted(sum(lengths[i] for i in row) for row in rows)
    assert len(loads) < 2 or loads[0] + loads[1] > 16 or len(rows) == 1


def random_rows(n: int, width: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, width + 1, n).astype(np.int32)
  ids = np.full((n, width), PAD, np.int32)
  types = np.zeros((n, width), np.int32)
  for i, k in enumerate(lengths):
    ids[i, :k] = rng.integers(3, 100, k)
    ids[i, 0] = 0  # [CLS] / <s>
    types[i, k // 2 : k] = 1  # a second segment, as sentence pairs have
  labels = rng.integers(0, 2, n).astype(np.int32)
  return ids, types, lengths, labels


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_packed_batch_layout(groups):
  ids, types, lengths, labels = random_rows(13, 16)
  take = np.arange(1, 13)[::-1]  # 12 of them, in some order, filled to 16
  b = packing.packed_batch(
    ids, types, lengths, labels, take, 16, groups, PAD, row_counts(16, groups)
  )
  rows, width = b["input_ids"].shape
  assert width == 16 and rows % groups == 0 and b["cls_index"].shape == (groups, 16 // groups)
  np.testing.assert_array_equal(b["labels"][:12], labels[take])
  np.testing.assert_array_equal(b["weights"], [1] * 12 + [0] * 4)
  per_group, flat = rows // groups, b["input_ids"].reshape(groups, -1)
  for pos, src in enumerate(take):  # each sequence sits whole in its own group's rows
    g, j = divmod(pos, 16 // groups)
    start = b["cls_index"][g, j]
    assert start < per_group * width
    np.testing.assert_array_equal(flat[g, start : start + lengths[src]], ids[src, : lengths[src]])
    seg = b["segment_ids"].reshape(groups, -1)[g, start : start + lengths[src]]
    assert len(set(seg.tolist())) == 1 and seg[0] > 0
  assert b["attention_mask"].sum() == lengths[take].sum()
  assert rows // groups in row_counts(16, groups)


def tiny_model(kind: str):
  config_class = transformers.BertConfig if kind == "bert" else transformers.RobertaConfig
  config = config_class(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
    type_vocab_size=2,
    pad_token_id=PAD,
  )
  module = models.auto_model(config, "sequence-classification")
  variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  params = lora_jax.lora_init(
    variables, lora_jax.LoraRule(["query", "value"], rank=2), rng=jax.random.key(1)
  )
  params = jax.tree.map(  # non-zero B: the adapters take part
    lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 2 else x, params
  )
  return module, params


# Two diagonal cases of the model x groups grid: BERT's and RoBERTa's positions each restart
# per packed sequence once, and one group and three each pack once (packed_batch's layout does
# not depend on the model; the model's positions not on the groups).
@pytest.mark.parametrize(("kind", "groups"), [("bert", 3), ("roberta", 1)])
def test_packed_rows_give_the_padded_logits_and_gradients(kind, groups):
  module, params = tiny_model(kind)
  apply = jax.jit(lora_jax.lora_apply(module.apply))
  ids, types, lengths, labels = random_rows(12, 16, seed=1)
  mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int32)
  padded = {
    "input_ids": ids,
    "attention_mask": mask,
    "token_type_ids": types,
    "labels": labels,
    "weights": np.ones(12, np.float32),
  }
  packed = packing.packed_batch(
    ids, types, lengths, labels, np.arange(12), 12, groups, PAD, row_counts(12, groups)
  )
  if groups == 1:
    assert packed["input_ids"].size < ids.size  # fewer tokens
  want = apply(params, ids, mask, types)
  got = apply(
    params,
    packed["input_ids"],
    packed["attention_mask"],
    packed["token_type_ids"],
    segment_ids=packed["segment_ids"],
    cls_index=packed["cls_index"],
  )
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params, ["classifier"]))

  def loss(t, batch):
    logits = glue_task.forward(lora_jax.lora_apply(module.apply), t, frozen, batch)
    return glue_task.loss_fn(logits, batch["labels"], batch["weights"], False)

  grad = jax.jit(jax.grad(loss))  # one program a shape, not op by op
  g_padded = grad(trainable, padded)
  g_packed = grad(trainable, packed)
  for a, b in zip(jax.tree.leaves(g_padded), jax.tree.leaves(g_packed), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_model_refuses_incomplete_packed_inputs():
  module, params = tiny_model("bert")
  ids = jnp.zeros((2, 8), jnp.int32)
  with pytest.raises(ValueError, match="need cls_index="):
    module.apply(params, ids, segment_ids=jnp.ones_like(ids))
  with pytest.raises(ValueError, match="pass their segment_ids= too"):
    module.apply(params, ids, cls_index=jnp.zeros((1, 2), jnp.int32))
