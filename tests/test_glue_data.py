"""train/data/glue.py: local files and the Hub path, tokenising, buckets, deterministic batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from train.data import batching
from train.data import glue as glue_data

SST2 = glue_data.TASKS["sst2"]


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
  return transformers.AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def sst2_examples(sst2_dir, tokenizer):
  raw = glue_data.load_raw(SST2, validation_file=str(sst2_dir / "validation.tsv"))
  tok = glue_data.tokenize(raw["validation"], tokenizer, ("sentence", None), 64)
  return glue_data.to_examples(tok, 64, pad_id=0, regression=False, names=None)


def test_local_tsv_keeps_quotes_and_every_row(sst2_dir):
  raw = glue_data.load_raw(
    SST2,
    train_file=str(sst2_dir / "train.tsv"),
    validation_file=str(sst2_dir / "validation.tsv"),
  )
  assert sorted(raw) == ["train", "validation"]
  assert (len(raw["train"]), len(raw["validation"])) == (67349, 872)
  assert sum(raw["validation"]["label"]) == 444
  quoted = [s for s in raw["validation"]["sentence"] if '"' in s or "``" in s or "''" in s]
  assert quoted, "sentences with quote characters survive (quoting disabled)"
  assert glue_data.split_names(raw, SST2, "eval") == ["validation"]
  assert glue_data.split_names(raw, SST2, "test") == []


def test_hub_is_the_default(monkeypatch):
  import datasets

  calls = []
  monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or {})
  glue_data.load_raw(glue_data.TASKS["mnli"])
  assert calls == [(("nyu-mll/glue", "mnli"), {})]
  hub = {"train": 0, "validation_matched": 0, "validation_mismatched": 0, "test_matched": 0}
  mnli = glue_data.TASKS["mnli"]
  assert glue_data.split_names(hub, mnli, "eval") == ["validation_matched", "validation_mismatched"]
  assert glue_data.split_names(hub, mnli, "test") == ["test_matched"]


def test_csv_and_json_files_with_string_labels(tmp_path, tokenizer):
  (tmp_path / "train.csv").write_text('s1,s2,label\n"a, b",c d,yes\ne,f,no\n')
  rows = [{"s1": "x", "s2": "y", "label": "no"}, {"s1": "z", "s2": "w", "label": "yes"}]
  (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  rte = glue_data.TASKS["rte"]
  raw = glue_data.load_raw(
    rte, train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.jsonl")
  )
  assert raw["train"]["s1"] == ["a, b", "e"]
  assert glue_data.text_keys(raw["train"], rte) == ("s1", "s2")  # run_glue.py's fallback
  names = glue_data.label_names(raw["train"], rte)
  assert names == ["no", "yes"]
  tok = glue_data.tokenize(raw["validation"], tokenizer, ("s1", "s2"), 16)
  ex = glue_data.to_examples(tok, 16, pad_id=0, regression=False, names=names)
  np.testing.assert_array_equal(ex.labels, [0, 1])
  assert ex.token_type_ids[0, : ex.lengths[0]].tolist() == [0, 0, 0, 1, 1]  # [CLS] x [SEP] y [SEP]


def test_bad_files_are_named(tmp_path):
  (tmp_path / "train.parquet").write_text("")
  with pytest.raises(ValueError, match=r"extension '\.parquet'; supported: \['\.csv'"):
    glue_data.load_raw(SST2, train_file=str(tmp_path / "train.parquet"))
  with pytest.raises(FileNotFoundError, match="nope.tsv"):
    glue_data.load_raw(SST2, train_file=str(tmp_path / "nope.tsv"))


def test_out_of_range_labels_are_refused(sst2_examples):
  glue_data.check_labels(sst2_examples, 2, "the training split")
  bad = glue_data.Examples(
    np.zeros((2, 4), np.int32), np.zeros((2, 4), np.int32), np.ones(2), np.array([0, 3])
  )
  with pytest.raises(ValueError, match=r"the training split has labels \[3\] outside 0..1"):
    glue_data.check_labels(bad, 2, "the training split")


def test_buckets():
  assert batching.bucket_lengths(64) == (16, 24, 32, 48, 64)
  assert batching.bucket_lengths(100) == (16, 24, 32, 48, 64, 96, 100)
  assert batching.bucket_lengths(16) == (16,)
  assert [batching.bucket_for(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]


def test_tokenised_rows_match_the_tokenizer(sst2_examples, sst2_dir, tokenizer):
  first = (sst2_dir / "validation.tsv").read_text().splitlines()[1].split("\t")[0]
  ids = tokenizer(first)["input_ids"]
  assert sst2_examples.input_ids[0, : len(ids)].tolist() == ids
  assert sst2_examples.lengths[0] == len(ids) and sst2_examples.input_ids[0, len(ids) :].sum() == 0
  assert sst2_examples.lengths.max() <= 64 and len(sst2_examples) == 872


def test_batches_are_padded_to_a_bucket_with_filler_rows(sst2_examples):
  buckets = batching.bucket_lengths(64)
  rows = np.array([3, 5, 7])
  batch = glue_data.make_batch(sst2_examples, rows, buckets, 4)
  longest = int(sst2_examples.lengths[rows].max())
  width = batching.bucket_for(longest, buckets)
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, width)
  np.testing.assert_array_equal(batch["attention_mask"][:3].sum(1), sst2_examples.lengths[rows])
  np.testing.assert_array_equal(batch["weights"], [1, 1, 1, 0])
  assert batch["attention_mask"][3].sum() == 1  # filler row: one token, no empty softmax


def test_train_stream_is_deterministic_and_resumable(sst2_examples):
  buckets = batching.bucket_lengths(64)
  per_epoch = len(sst2_examples) // 100  # 8 batches of 100, the last 72 rows dropped

  def take(stream, n):
    return [next(stream)["input_ids"] for _ in range(n)]

  a = take(glue_data.train_batches(sst2_examples, 100, buckets, seed=1), 12)
  b = take(glue_data.train_batches(sst2_examples, 100, buckets, seed=1, start=5), 7)
  c = take(glue_data.train_batches(sst2_examples, 100, buckets, seed=2), 1)
  for x, y in zip(a[5:], b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert a[0].shape != c[0].shape or (a[0] != c[0]).any()  # another seed, another order
  order0 = batching.epoch_order(len(sst2_examples), 1, 0)
  order1 = batching.epoch_order(len(sst2_examples), 1, 1)
  assert sorted(order0) == list(range(len(sst2_examples))) and (order0 != order1).any()
  first_of_epoch1 = sst2_examples.input_ids[order1[:100], : a[per_epoch].shape[1]]
  np.testing.assert_array_equal(a[per_epoch], first_of_epoch1)
  with pytest.raises(ValueError, match="fewer than one global batch of 1000"):
    next(glue_data.train_batches(sst2_examples, 1000, buckets, seed=1))


def test_eval_batches_cover_every_row_once_in_few_shapes(sst2_examples):
  seen, shapes = [], set()
  for rows, batch in glue_data.eval_batches(sst2_examples, 128, batching.bucket_lengths(64)):
    seen += rows.tolist()
    shapes.add(batch["input_ids"].shape)
    assert batch["weights"].sum() == len(rows)
  assert sorted(seen) == list(range(872))
  assert len(shapes) <= 5 and {s[0] for s in shapes} == {128}
