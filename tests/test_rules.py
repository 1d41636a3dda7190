"""LoraRule validation and PEFT-style shorthands."""

import pytest

from lora_jax import LoraRule


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"rank": 0}, r"rank=0 must be a positive integer"),
    ({"rank": -3}, r"rank=-3 must be a positive integer"),
    ({"rank": 2.5}, r"rank=2.5 must be a positive integer"),
    ({"rank": 4, "dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ({"rank": 4, "dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
    ({"rank": 4, "init": "loftq"}, r"init='loftq' is not one of \['gaussian', 'kaiming_uniform', "),
    ({"rank": 4, "init": "pissa_niter_0"}, r"init='pissa_niter_0' is not one of .*positive"),
    ({"rank": 4, "alpha": 0}, r"alpha=0 must be positive"),
    ({"rank": 4, "alpha": -2.0}, r"alpha=-2.0 must be positive and finite"),
    ({"rank": 4, "alpha": float("inf")}, r"alpha=inf must be positive and finite"),
    ({"rank": 4, "alpha": float("-inf")}, r"alpha=-inf must be positive and finite"),
    ({"rank": 4, "alpha": float("nan")}, r"alpha=nan must be positive and finite"),
    ({"rank": 4, "alpha": "16"}, r"alpha='16' must be positive and finite"),
    ({"rank": 4, "dropout": float("nan")}, r"dropout=nan must be in \[0, 1\)"),
    ({"rank": 4, "dropout": float("inf")}, r"dropout=inf must be in \[0, 1\)"),
    ({"rank": 4, "dropout": True}, r"dropout=True must be in \[0, 1\)"),
  ],
)
def test_invalid_values_raise_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LoraRule(".*", **kwargs)


def test_invalid_patterns():
  with pytest.raises(ValueError, match=r"pattern='\(' is not a valid regex"):
    LoraRule("(", rank=1)
  with pytest.raises(ValueError, match="non-empty list of module names"):
    LoraRule([], rank=1)


def test_regex_is_fullmatched():
  rule = LoraRule(r"params/encoder/layer/\d+/attention/self/query", rank=2)
  assert rule.matches("params/encoder/layer/11/attention/self/query")
  assert not rule.matches("params/encoder/layer/11/attention/self/query_proj")
  assert not rule.matches("x/params/encoder/layer/1/attention/self/query")


def test_peft_names_match_path_suffixes():
  rule = LoraRule(["query", "output.dense"], rank=2)
  assert rule.matches("params/encoder/layer/0/attention/self/query")
  assert rule.matches("params/encoder/layer/0/attention/output/dense")
  assert rule.matches("params/encoder/layer/0/output/dense")
  assert not rule.matches("params/encoder/layer/0/intermediate/dense")
  assert not rule.matches("params/encoder/layer/0/attention/self/myquery")
  assert rule.targets() == ("query", "output.dense")


def test_all_linear_and_exclude():
  rule = LoraRule("all-linear", rank=2, exclude=["classifier"])
  assert rule.matches("params/encoder/layer/0/intermediate/dense", linear=True)
  assert not rule.matches("params/embeddings/word_embeddings", linear=False)
  assert not rule.matches("params/classifier", linear=True)


def test_scale_and_alpha_defaults():
  assert LoraRule(".*", rank=8).scale == 1.0
  assert LoraRule(".*", rank=8, alpha=16).scale == 2.0
  assert LoraRule(".*", rank=16, alpha=16, rslora=True).scale == 4.0


def test_rules_are_immutable_and_hashable():
  rule = LoraRule(["query", "value"], rank=8)
  with pytest.raises(AttributeError):
    rule.rank = 4
  assert hash(rule) == hash(LoraRule(("query", "value"), rank=8))


def test_all_linear_leaves_a_language_model_head_alone():
  rule = LoraRule("all-linear", rank=4)
  assert rule.matches("params/model/layers/0/mlp/up_proj", True)
  assert not rule.matches("params/lm_head", True)  # as PEFT's all-linear
  assert LoraRule(["lm_head"], rank=4).matches("params/lm_head", True)  # named: adapted
