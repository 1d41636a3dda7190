"""The PyTorch + PEFT causal-LM LoRA step for the benchmark's LLM configurations.

``transformers.LlamaForCausalLM`` from the same ``LlamaConfig`` as the lora_jax side,
``peft.LoraConfig(r, lora_alpha, target_modules=q_proj ... down_proj, task_type="CAUSAL_LM")``
(the PEFT anchor's ``llama-1.1B`` setup), fused AdamW, the loss transformers computes from
``labels`` (mean next-token cross-entropy, ``-100`` ignored): the targets of
``bench/llm_batch.py``, the same batch as lora_jax's. A packed batch goes in as
``position_ids`` restarting with each sequence and no ``attention_mask``, from which
transformers builds the block-causal mask of packed sequences; a padded batch as
``attention_mask``. ``--remat`` is gradient checkpointing, ``--base_dtype bfloat16`` casts the
base before PEFT wraps it (adapters stay float32), ``--dtype bfloat16`` is autocast.
"""

from __future__ import annotations

import peft
import torch
import transformers

from bench import configs
from bench import llm_batch
from bench import torch_train


def model_inputs(cfg: configs.BenchConfig, seed: int, device: torch.device) -> dict:
  """The keyword arguments of ``LlamaForCausalLM`` for ``llm_batch.make_batch``'s batch."""
  b = llm_batch.make_batch(cfg.seq, cfg.batch, cfg.model.vocab, cfg.batch_kind, seed)
  inputs = {
    "input_ids": torch.from_numpy(b["input_ids"]).long().to(device),
    "labels": torch.from_numpy(b["labels"]).to(device),
    "use_cache": False,
  }
  if cfg.batch_kind == "packed":
    inputs["position_ids"] = torch.from_numpy(b["positions"]).long().to(device)
  else:
    inputs["attention_mask"] = torch.from_numpy(b["attention_mask"]).long().to(device)
  return inputs


def build(cfg: configs.BenchConfig, opts: dict, device: torch.device, sync):
  """``bench/peft_step.py``'s ``(step, counts, losses, attention implementation)``."""
  torch.manual_seed(opts["seed"])
  hf = transformers.LlamaConfig.from_dict(opts["hf_config"])
  lora = peft.LoraConfig(
    r=cfg.rank,
    lora_alpha=cfg.alpha,
    target_modules=list(cfg.targets),
    lora_dropout=opts["lora_dropout"],
    task_type="CAUSAL_LM",
  )
  model, params, opt, attn_impl = torch_train.prepare(
    transformers.LlamaForCausalLM(hf).to(device), opts, lora
  )
  inputs = model_inputs(cfg, opts["seed"], device)
  step, counts, losses = torch_train.make_step(
    model, params, opt, opts, lambda fn: fn(**inputs), device, sync
  )
  return step, counts, losses, attn_impl
