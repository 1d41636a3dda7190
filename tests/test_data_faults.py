"""Bad data is refused before training, in one line naming the split, its file and what is valid
(issue 14): GLUE files (train/data/glue.py) and causal-LM files (train/data/clm.py).

Most tests call the data functions directly (fast); one run per script checks the whole path:
exit status 2, one line on stderr, nothing written.
"""

from __future__ import annotations

import json
import logging
import pathlib

import datasets
import pytest
import transformers
from helpers import script_main

from train import run_clm
from train import run_glue
from train.data import clm as clm_data
from train.data import glue as glue_data

REPO = pathlib.Path(__file__).resolve().parent.parent
GLUE = REPO / "configs" / "quickstart"
CLM = REPO / "configs" / "clm_quickstart"
SST2 = glue_data.TASKS["sst2"]
RTE = glue_data.TASKS["rte"]
STSB = glue_data.TASKS["stsb"]


@pytest.fixture(scope="module")
def bert_tokenizer():
  return transformers.AutoTokenizer.from_pretrained(GLUE)


@pytest.fixture(scope="module")
def clm_tokenizer():
  return transformers.AutoTokenizer.from_pretrained(CLM)


def _write(path: pathlib.Path, text: str) -> str:
  path.write_text(text)
  return str(path)


def _tsv(path: pathlib.Path, header: str, *rows: str) -> str:
  return _write(path, "".join(line + "\n" for line in (header, *rows)))


def _jsonl(path: pathlib.Path, *rows: dict) -> str:
  return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


GOOD = ("a good film .\t1", "a bad film .\t0")


# ---------------------------------------------------------------------------------------------
# GLUE: columns.


@pytest.mark.parametrize("split", ["train", "validation"])
def test_a_labelled_split_without_a_label_column_is_refused(tmp_path, split):
  files = {
    "train_file": _tsv(tmp_path / "train.tsv", "sentence\tlabel", *GOOD),
    "validation_file": _tsv(tmp_path / "dev.tsv", "sentence\tlabel", *GOOD),
  }
  files[f"{split}_file"] = _tsv(tmp_path / "bare.tsv", "sentence", "a good film .")
  with pytest.raises(ValueError) as e:
    glue_data.load_raw(SST2, **files)
  assert str(e.value) == (
    f"the {split} split ({files[f'{split}_file']!r}) has no column 'label'; its columns: "
    f"['sentence'] (task sst2 reads ['sentence', 'label']"
    + (")" if split == "train" else ", as the train split)")
  )


def test_a_test_split_needs_no_labels(tmp_path):
  raw = glue_data.load_raw(
    SST2,
    train_file=_tsv(tmp_path / "train.tsv", "sentence\tlabel", *GOOD),
    test_file=_tsv(tmp_path / "test.tsv", "index\tsentence", "0\ta film ."),
  )
  assert raw["test"].column_names == ["index", "sentence"]
  hub_test = datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [-1, -1]})
  glue_data.check_splits({"test": hub_test}, SST2, {"test": "the Hub"})  # GLUE's "no label"


def test_every_split_needs_the_train_splits_text_columns(tmp_path):
  train = _tsv(tmp_path / "train.tsv", "text\tlabel", *GOOD)
  dev = _tsv(tmp_path / "dev.tsv", "sentence\tlabel", *GOOD)
  with pytest.raises(ValueError) as e:
    glue_data.load_raw(SST2, train_file=train, validation_file=dev)
  assert str(e.value) == (
    f"the validation split ({dev!r}) has no column 'text'; its columns: ['sentence', 'label'] "
    "(task sst2 reads ['text', 'label'], as the train split)"
  )
  test = _tsv(tmp_path / "test.tsv", "index\ts1", "0\ta")  # a pair task: two texts
  with pytest.raises(ValueError, match=r"the test split \(.*test.tsv'\) has no column 's2'"):
    glue_data.load_raw(RTE, train_file=_tsv(tmp_path / "rte.tsv", "s1\ts2\tlabel", "a\tb\t0"),
                       test_file=test)  # fmt: skip
  with pytest.raises(ValueError, match=r"the train split \(.*only.tsv'\): no text column in"):
    glue_data.load_raw(SST2, train_file=_tsv(tmp_path / "only.tsv", "label", "0"))


# ---------------------------------------------------------------------------------------------
# GLUE: empty and unreadable files.


@pytest.mark.parametrize(
  ("name", "text", "message"),
  [
    ("zero.tsv", "", "is empty"),
    ("blank.tsv", "\n\n", "is empty (blank lines only)"),
    ("header.tsv", "sentence\tlabel\n", "has a header but no rows"),
    ("header_blank.csv", "sentence,label\n\n", "has a header but no rows"),
    ("objects.jsonl", "{}\n{}\n", "holds no rows"),
    ("array.json", "[]", "holds no rows"),
    (
      "ragged.tsv",
      "sentence\tlabel\na\t0\nb\t1\t2\n",
      "could not be read as csv: Error tokenizing",
    ),
  ],
)
def test_empty_and_unreadable_files_are_named(tmp_path, name, text, message):
  path = _write(tmp_path / name, text)
  with pytest.raises(ValueError) as e:
    glue_data.load_raw(SST2, train_file=path)
  assert str(e.value).startswith(f"data file {path!r} {message}"), str(e.value)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# GLUE: labels, every labelled split.


@pytest.mark.parametrize(
  ("split", "label", "message"),
  [
    ("validation", "7", "has label 7; valid: 0..1 (task sst2 has 2 classes)"),
    ("validation", "-1", "has label -1; valid: 0..1 (task sst2 has 2 classes)"),
    ("train", "2", "has label 2; valid: 0..1 (task sst2 has 2 classes)"),
    ("validation", "0.5", "has label 0.5; valid: 0..1"),
    ("validation", "", "has rows with an empty label"),
    (
      "validation",
      "pos",
      "has label names ['0', '1', 'pos'] but the train split numeric labels; use one kind",
    ),
  ],
)
def test_bad_labels_are_refused_with_split_file_value_and_range(tmp_path, split, label, message):
  files = {
    "train_file": _tsv(tmp_path / "train.tsv", "sentence\tlabel", *GOOD),
    "validation_file": _tsv(tmp_path / "dev.tsv", "sentence\tlabel", *GOOD),
  }
  files[f"{split}_file"] = _tsv(tmp_path / "bad.tsv", "sentence\tlabel", *GOOD, f"odd .\t{label}")
  with pytest.raises(ValueError) as e:
    glue_data.load_raw(SST2, **files)
  assert str(e.value).startswith(f"the {split} split ({files[f'{split}_file']!r}) {message}")


def test_named_labels_must_agree_across_splits_and_fit_the_task(tmp_path):
  def load(train_labels, dev_labels, task=SST2):
    return glue_data.load_raw(
      task,
      train_file=_tsv(tmp_path / "t.tsv", "sentence\tlabel", *(f"x\t{y}" for y in train_labels)),
      validation_file=_tsv(tmp_path / "d.tsv", "sentence\tlabel", *(f"x\t{y}" for y in dev_labels)),
    )

  raw = load(["neg", "pos"], ["pos"])
  assert glue_data.label_names(raw["train"], SST2) == ["neg", "pos"]
  with pytest.raises(ValueError, match=r"validation split .* has labels \['meh'\], not among the "):
    load(["neg", "pos"], ["pos", "meh"])
  with pytest.raises(ValueError, match=r"train split .* 3 label names \['meh', 'neg', 'pos'\]; "):
    load(["neg", "pos", "meh"], ["pos"])
  with pytest.raises(ValueError, match=r"validation split .* has numeric labels \[1\] but the "):
    load(["neg", "pos"], [1])
  with pytest.raises(ValueError, match=r"validation split .* has labels \['high'\]; task stsb "):
    load(["1.5", "4.0"], ["high"], STSB)  # regression: numbers (the train file's are)
  load([0.5, 4.0], [3.25], STSB)


def test_hub_class_labels_pass():
  features = datasets.Features({"label": datasets.ClassLabel(names=["negative", "positive"])})
  ds = datasets.Dataset.from_dict({"label": [0, 1, 1]}, features=features)
  glue_data.check_split_labels(ds, SST2, "the train split", ["negative", "positive"])


# ---------------------------------------------------------------------------------------------
# max_seq_length below the tokenizer's special tokens.


def test_a_max_seq_length_below_the_special_tokens_is_refused(bert_tokenizer):
  ds = datasets.Dataset.from_dict({"s1": ["a good film"], "s2": ["it was"], "label": [1]})
  with pytest.raises(ValueError) as e:
    glue_data.tokenize(ds, bert_tokenizer, ("s1", None), 2)
  assert str(e.value) == (
    "--max_seq_length 2 is too small: the tokenizer adds 2 special tokens to each text, so the "
    "minimum is 3"
  )
  with pytest.raises(ValueError, match="adds 3 special tokens to each pair of texts, so the mini"):
    glue_data.tokenize(ds, bert_tokenizer, ("s1", "s2"), 4)
  for keys, least in ((("s1", None), 3), (("s1", "s2"), 5)):  # the minimum works
    tok = glue_data.tokenize(ds, bert_tokenizer, keys, least)
    ex = glue_data.to_examples(tok, least, pad_id=0, regression=False, names=None)
    assert ex.lengths.tolist() == [least]


# ---------------------------------------------------------------------------------------------
# Causal-LM data.


def test_clm_max_seq_length_must_leave_a_target(clm_tokenizer):
  rows = [json.loads(line)["messages"] for line in open(CLM / "train.jsonl")][:8]
  ds = datasets.Dataset.from_dict({"messages": rows})
  with pytest.raises(ValueError, match=r"^--max_seq_length 1 is too small: a causal LM needs at "):
    clm_data.encode(ds, "messages", "messages", clm_tokenizer, 1, True, "the train split")
  with pytest.raises(ValueError) as e:  # the prompts fill the first 2 tokens: no reply is left
    clm_data.encode(ds, "messages", "messages", clm_tokenizer, 2, True, "the train split")
  assert str(e.value).startswith(
    "the train split: none of its 8 examples has a target token within max_seq_length=2 tokens "
    "(8 truncated): raise --max_seq_length"
  )
  seqs = clm_data.encode(ds, "messages", "messages", clm_tokenizer, 2, False, "the train split")
  assert all(w[1] == 1 for w in seqs.weights)  # every token a target: 2 tokens make one


def test_clm_rows_with_empty_text_or_turns_are_refused(clm_tokenizer, caplog):
  with pytest.raises(ValueError, match=r"^the train split: all of its 2 rows have an empty text$"):
    clm_data.encode_text(["", " \n"], clm_tokenizer, 16, "the train split")
  with caplog.at_level(logging.WARNING):
    seqs = clm_data.encode_text(["march 5 2021", ""], clm_tokenizer, 16, "the train split")
  assert len(seqs) == 2 and "the train split: 1 of 2 rows have an empty text" in caplog.text
  with pytest.raises(ValueError, match=r"^v: row 1 is not a non-empty list of turns: \[\]$"):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "2021"}]
    clm_data.encode_conversations([conv, []], clm_tokenizer, 64, True, "v")


@pytest.mark.parametrize(
  ("name", "text", "message"),
  [
    ("blank.jsonl", "\n \n", "is empty (blank lines only)"),
    ("objects.jsonl", "{}\n{}\n", "holds no rows"),
    ("array.json", "[]", "holds no rows"),
    ("header.csv", "text\n", "has a header but no rows"),
    ("broken.jsonl", '{"text": "a"}\n{"text": \n', "could not be read as json: JSON parse error"),
  ],
)
def test_clm_empty_and_unreadable_files_are_named(tmp_path, name, text, message):
  path = _write(tmp_path / name, text)
  with pytest.raises(ValueError) as e:
    clm_data.load_raw(train_file=path)
  assert str(e.value).startswith(f"data file {path!r} {message}"), str(e.value)
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# End to end: exit 2, one line, before any training.


def test_run_glue_refuses_a_bad_validation_label_before_training(capsys, tmp_path):
  dev = _tsv(tmp_path / "dev.tsv", "sentence\tlabel", *GOOD, "odd .\t7")
  out = tmp_path / "out"
  config = str(REPO / "configs" / "quickstart.yaml")
  code, err = script_main(capsys, run_glue.main, "--config", config, "--validation_file", dev,
                    "--output_dir", str(out), "--no-progress")  # fmt: skip
  assert code == 2 and err == [
    f"run_glue.py: error: the validation split ({dev!r}) has label 7; valid: 0..1 "
    "(task sst2 has 2 classes)"
  ], err
  assert not any(out.glob("*"))  # nothing trained, nothing written


def test_run_clm_refuses_bad_data_before_training(capsys, tmp_path):
  config = str(REPO / "configs" / "clm_quickstart.yaml")
  out = tmp_path / "out"
  common = ["--config", config, "--output_dir", str(out), "--no-progress"]
  texts = _jsonl(tmp_path / "texts.jsonl", {"text": "march 5 2021"}, {"text": "may 1 1999"})
  cases = [
    (["--max_seq_length", "1"], "--max_seq_length 1 is too small"),
    (["--max_seq_length", "2"], "(the train split): none of its 2000 examples has a target token"),
    (["--validation_file", texts], "the validation split has no 'messages' column"),
    (
      ["--train_file", _jsonl(tmp_path / "e.jsonl", {"text": ""}, {"text": ""})],
      "all of its 2 rows have an empty text",
    ),  # fmt: skip
  ]
  for extra, message in cases:
    code, err = script_main(capsys, run_clm.main, *common, *extra)
    assert code == 2 and len(err) == 1, (extra, err)
    assert err[0].startswith("run_clm.py: error: ") and message in err[0], (extra, err)
  assert not any(out.glob("*"))
