"""Model FLOPs of one training step, counted as ``../shared/bench/peft_baseline.py`` counts them.

``N`` is the number of matmul weights (every linear layer's kernel, classifier or LM head
included, no embeddings, no biases, no adapters) and ``T = batch * seq`` the tokens of a step:

* LoRA: ``4 N T + attention``: the frozen weights cost a forward (``2 N T``) and an
  input-gradient (``2 N T``) matmul; no weight gradient exists on the low-rank path.
* full fine-tuning: ``6 N T + attention`` (the weight gradient adds ``2 N T``).
* attention: ``12 B S^2 d L`` (``QK^T`` and ``PV`` forward, ``4 B S^2 d L``, times three for
  forward + backward), whatever trains; for causal LMs too (XLA's attention computes every
  score and masks; only a fused kernel could skip the masked half).

Adapter matmuls, the classifier acting on one token per row, LayerNorm, softmax and the
optimizer are left out, as in the PEFT baseline, so MFU figures compare one to one with it.
"""

from __future__ import annotations

from bench.configs import BenchConfig


def matmul_params(cfg: BenchConfig) -> int:
  """Linear weights of the RoBERTa sequence classifier: 6 per layer plus the head's two; of a
  causal LM: 7 per layer (grouped-query ``k_proj``/``v_proj``) plus the ``lm_head`` (tied or
  not, it is a matmul of every token).

  Example:
    >>> from bench.configs import CONFIGS
    >>> matmul_params(CONFIGS["roberta-base-128x32"])  # PEFT's n_matmul for roberta-base
    85526016
    >>> matmul_params(CONFIGS["llama-1.1b-1024x8-packed"])  # TinyLlama's 1.1B minus embeddings
    1034420224
  """
  m = cfg.model
  if cfg.is_llm:
    kv = m.hidden // m.heads * m.kv_heads
    per_layer = 2 * m.hidden * m.hidden + 2 * m.hidden * kv + 3 * m.hidden * m.ffn
    return m.layers * per_layer + m.hidden * m.vocab
  per_layer = 4 * m.hidden * m.hidden + 2 * m.hidden * m.ffn
  return m.layers * per_layer + m.hidden * m.hidden + m.hidden * m.labels


def attention_flops(cfg: BenchConfig) -> int:
  """``12 B S^2 d L``: score and value matmuls, forward and backward."""
  m = cfg.model
  return 12 * cfg.batch * cfg.seq * cfg.seq * m.hidden * m.layers


def model_flops(cfg: BenchConfig) -> int:
  """FLOPs of one step: ``(4 if LoRA else 6) * N * T`` plus attention.

  Example:
    >>> from bench.configs import CONFIGS
    >>> round(model_flops(CONFIGS["roberta-large-512x16"]) / 1e12, 2)  # TFLOP per step
    11.17
  """
  per_token = 4 if cfg.mode == "lora" else 6
  return per_token * matmul_params(cfg) * cfg.tokens + attention_flops(cfg)
