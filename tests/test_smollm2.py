"""The real SmolLM2-135M-Instruct (Llama architecture, 30 layers, GQA 9/3, tied embeddings) against
transformers and PEFT: logits, greedy chat answers with and without an adapter, adapter files.

Marked slow (a minute or two on 2 CPU cores); ``.ci/run`` runs them after the README's suite.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers
from llm import adapted
from llm import max_error
from llm import torch_logits

import lora_jax
from lora_jax.models import from_pretrained
from lora_jax.models import generate

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
QUESTIONS = [
  "What is the capital of France?",
  "Write the date March 5, 2021 in ISO format.",
  "Name three primary colors.",
  "What is 12 times 12?",
]


@pytest.fixture(scope="module")
def smol(smollm2_path):
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path)
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(
    smollm2_path, dtype=torch.float32
  ).eval()
  module, variables = from_pretrained(smollm2_path, scan_layers=True)
  prompts = [
    tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
      "input_ids"
    ]
    for q in QUESTIONS
  ]
  return tokenizer, torch_model, module, variables, prompts


def _torch_greedy(model, prompts, eos, max_new_tokens=32):
  out = []
  for p in prompts:
    ids = torch.tensor([p])
    g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=max_new_tokens, eos_token_id=eos)  # fmt: skip
    out.append(g[0, len(p) :].tolist())
  return out


def _batch(tokenizer):
  batch = tokenizer(["Hello there, how are you today?", "Paris is", "1 2 3 4"], padding=True)
  return np.array(batch["input_ids"]), np.array(batch["attention_mask"])


def test_logits_match_transformers(smol, smollm2_path):
  tokenizer, torch_model, module, variables, _ = smol
  ids, mask = _batch(tokenizer)
  assert (mask == 0).any()
  ref = torch_logits(torch_model, ids, mask)
  assert max_error(jax.jit(module.apply)(variables, ids, mask), ref, mask) <= 1e-3
  loop, loop_vars = from_pretrained(smollm2_path)
  assert max_error(jax.jit(loop.apply)(loop_vars, ids, mask), ref, mask) <= 1e-3


def test_greedy_chat_answers_equal_transformers(smol):
  tokenizer, torch_model, module, variables, prompts = smol
  eos = tokenizer.eos_token_id
  ours = generate(module, variables, prompts, max_new_tokens=32, eos_token_id=eos)
  assert ours == _torch_greedy(torch_model, prompts, eos)
  assert tokenizer.decode(ours[0], skip_special_tokens=True) == "The capital of France is Paris."


def test_adapter_generation_equals_merged_and_peft(smol, tmp_path):
  tokenizer, torch_model, module, variables, prompts = smol
  eos = tokenizer.eos_token_id
  rule = lora_jax.LoraRule(["q_proj", "v_proj"], rank=8, alpha=16)
  params = adapted(module, variables, rule, seed=0, scale=0.05)
  tuned = generate(module, params, prompts, max_new_tokens=32, eos_token_id=eos)
  base = generate(module, variables, prompts, max_new_tokens=32, eos_token_id=eos)
  assert tuned != base  # the adapter changes the answers
  merged = generate(module, lora_jax.merge(params), prompts, max_new_tokens=32, eos_token_id=eos)
  assert merged == tuned
  folder = lora_jax.export_peft(
    tmp_path, params, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
    config=torch_model.config, task_type="CAUSAL_LM",
  )  # fmt: skip
  peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
  try:
    assert _torch_greedy(peft_model, prompts, eos) == tuned
    ids, mask = _batch(tokenizer)
    ours = lora_jax.lora_apply(module.apply)(params, ids, mask)
    assert max_error(ours, torch_logits(peft_model, ids, mask), mask) <= 1e-3
    back = lora_jax.import_peft(folder, variables, config=torch_model.config)
    np.testing.assert_allclose(lora_jax.lora_apply(module.apply)(back, ids, mask), ours, atol=1e-5)
  finally:
    peft_model.unload()
