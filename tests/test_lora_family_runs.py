"""The LoRA-family flags of both scripts, end to end (issue 12, item 6): ``--use_dora``,
``--init_lora_weights``, ``--quantize`` (``--loraplus_lr_ratio``: tests/test_glue_train.py).

Each run is a few steps on the tiny random BERT of ``test_glue_train.py`` or the causal-LM
quickstart's Llama; what the flags do to the numbers is tested in the library's own tests
(test_dora.py, test_svd_init.py, test_quantize.py). Here: the flags reach the adapters, and what
a run leaves (the PEFT adapter, ``merged/``) gives the model the run trained. The training runs
are marked ``slow`` (about a minute together); ``.ci/run`` runs them.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers
from conftest import REPO
from test_glue_train import run_args
from test_glue_train import write_tiny_bert

import lora_jax
from lora_jax import models
from train.data import glue as glue_data
from train.engine import outputs
from train.tasks.clm import args as clm_args
from train.tasks.clm import pipeline as clm_train
from train.tasks.glue import args as glue_args
from train.tasks.glue import pipeline as glue_train

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, sst2_dir):
  return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), sst2_dir, dropout=0.0)


def specs(params) -> list[lora_jax.LoraSpec]:
  is_spec = lambda x: isinstance(x, lora_jax.LoraSpec)  # noqa: E731
  return [x for x in jax.tree.leaves(params, is_leaf=is_spec) if is_spec(x)]


def sentences(sst2_dir, tokenizer):
  lines = (sst2_dir / "validation.tsv").read_text().splitlines()[1:9]
  text = [line.split("\t")[0] for line in lines]
  return tokenizer(text, padding=True, truncation=True, max_length=16, return_tensors="np")


def merged_logits(folder, batch) -> np.ndarray:
  """The logits of the transformers model in ``folder`` (``--export_merged``'s)."""
  import torch

  model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def adapter_logits(model_dir, adapter_dir, seed, batch) -> np.ndarray:
  """The logits of the run's PEFT adapter imported onto the original checkpoint."""
  config = transformers.AutoConfig.from_pretrained(model_dir, num_labels=2)
  # the checkpoint has no pooler: the run drew it from --seed, and so does this reference
  module, base = models.from_pretrained(
    model_dir, "sequence-classification", num_labels=2, rng=seed
  )
  params = lora_jax.import_peft(adapter_dir, base, config=config)
  return np.asarray(
    lora_jax.lora_apply(module.apply)(
      params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  ("flags", "peft_config"),
  [
    (("--use_dora", "--init_lora_weights", "kaiming"), {"use_dora": True, "r": 4}),
    # OLoRA (as PiSSA, whose export is the same code) moves part of each W into the adapter;
    # the export rewrites the trained adapter for the original weights, at rank 2r
    (("--init_lora_weights", "olora"), {"use_dora": False, "r": 8}),
  ],
  ids=["dora", "olora"],
)
def test_glue_flags_reach_the_adapters_and_the_exports(tiny_bert, sst2_dir, tmp_path, flags,
                                                       peft_config):  # fmt: skip
  out = tmp_path / "run"
  args = run_args(tiny_bert, sst2_dir, out, "--max_steps", "3", "--learning_rate", "1e-2",
                  "--save_steps", "0", "--export_merged", *flags)  # fmt: skip
  _, start, _ = glue_train.load_model(args, glue_data.TASKS["sst2"])
  init = {"kaiming": "kaiming_uniform"}.get(flags[-1], flags[-1])
  assert {(s.use_dora, s.init) for s in specs(start)} == {("--use_dora" in flags, init)}
  glue_train.train_and_evaluate(args)
  config = json.loads((out / "adapter" / "adapter_config.json").read_text())
  assert {k: config[k] for k in peft_config} == peft_config
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
  batch = sentences(sst2_dir, tokenizer)
  ours = adapter_logits(tiny_bert, out / "adapter", args.seed, batch)
  np.testing.assert_allclose(merged_logits(out / "merged", batch), ours, atol=1e-4)
  # and that model is not the base: the adapter trained (and the export kept it)
  module, base = models.from_pretrained(tiny_bert, "sequence-classification", num_labels=2,
                                        rng=args.seed)  # fmt: skip
  untuned = module.apply(base, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  assert np.abs(ours - np.asarray(untuned)).max() > 1e-3


@pytest.mark.slow
def test_quantize_flag_gives_a_qlora_run_that_learns(tmp_path, monkeypatch):
  """``run_clm.py --quantize nf4`` on the quickstart's from-scratch Llama: every linear kernel
  of the base (not the embeddings) is NF4, the loss falls, and the random base written beside
  the adapter is the dequantized one the adapter was trained on."""
  monkeypatch.chdir(tmp_path)
  config = str(REPO / "configs" / "clm_quickstart.yaml")
  args = clm_args.parse_args(
    ["--config", config, "--max_steps", "16", "--logging_steps", "4", "--eval_steps", "0",
     "--max_eval_samples", "64", "--generation_prompts_file", "", "--no-progress",
     "--output_dir", str(tmp_path / "run"), "--quantize", "nf4"]
  )  # fmt: skip
  _, params, _ = clm_train.load_model(args)
  layers = params["params"]["model"]["layers"]
  kinds = {
    name: getattr(module.get("kernel"), "kind", None)
    for group in (layers["self_attn"], layers["mlp"])
    for name, module in group.items()
  }
  assert kinds == dict.fromkeys(kinds, "nf4") and sorted(kinds) == sorted(PROJECTIONS), kinds
  assert not isinstance(
    params["params"]["model"]["embed_tokens"]["embedding"], lora_jax.QuantizedArray
  )
  clm_train.train_and_evaluate(args)
  losses = [
    r["loss"] for r in outputs.read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r
  ]
  assert len(losses) == 4 and losses[-1] < losses[0], losses
  base = safetensors.numpy.load_file(tmp_path / "run" / "base_model" / "model.safetensors")
  q_proj = layers["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(
    base["model.layers.1.self_attn.q_proj.weight"], np.asarray(lora_jax.dequantize(q_proj))[1].T
  )


@pytest.mark.parametrize(
  ("argv", "expected"),
  [
    (["--init_lora_weights", "svd"], "argument --init_lora_weights: invalid choice: 'svd'"),
    (["--init_lora_weights", "pissa_niter_x"], "invalid choice: 'pissa_niter_x'"),
    (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4' (choose from 'nf4'"),
  ],
)
def test_bad_family_flags_are_one_line_errors(capsys, argv, expected):
  with pytest.raises(SystemExit) as e:
    glue_args.parse_args(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and expected in err, err


def test_quantize_with_a_start_that_rewrites_the_base_is_refused(tiny_bert, sst2_dir, tmp_path):
  args = run_args(
    tiny_bert, sst2_dir, tmp_path, "--quantize", "nf4", "--init_lora_weights", "olora"
  )
  with pytest.raises(ValueError, match="--quantize nf4 with --init_lora_weights olora is not"):
    glue_train.train_and_evaluate(args)
  assert not any(tmp_path.iterdir())  # refused before anything was written
