"""Small random Llama-family checkpoints (transformers + torch) shared by the decoder tests."""

from __future__ import annotations

import math
import pathlib
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
import pytest
import transformers

SMALL = dict(
  vocab_size=97,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=3,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=256,
)
_LLAMA3 = {
  "rope_type": "llama3",
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}
# One config per family difference the decoder implements (see lora_jax.models.decoder.llama).
FAMILIES: dict[str, tuple[str, dict]] = {
  "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
  "llama-tied-bias-llama3": (
    "llama",
    dict(
      tie_word_embeddings=True,
      attention_bias=True,
      mlp_bias=True,
      rope_theta=5e5,
      rope_scaling=_LLAMA3,
    ),
  ),
  "llama-linear-rope": (
    "llama",
    dict(
      rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0}, num_key_value_heads=4
    ),
  ),
  "mistral-window": ("mistral", dict(sliding_window=3, tie_word_embeddings=False)),
  "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True)),
  "qwen3-qknorm": ("qwen3", dict(head_dim=24, tie_word_embeddings=False)),
}
_CONFIGS = {
  "llama": transformers.LlamaConfig,
  "mistral": transformers.MistralConfig,
  "qwen2": transformers.Qwen2Config,
  "qwen3": transformers.Qwen3Config,
}


def config(name: str, **kw) -> Any:
  model_type, extra = FAMILIES[name]
  return _CONFIGS[model_type](**{**SMALL, **extra, **kw})


def randomize(model, seed: int = 0, gain: float = 1.0):
  """Weights that give O(1) activations and logits (transformers' 0.02 init makes every logit
  nearly 0, so parity tests would compare almost-zeros): linear weights ~ N(0, 1/fan_in),
  embeddings N(0, 1), norm scales near 1, biases small."""
  torch = pytest.importorskip("torch")
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("bias"):
        p.copy_(0.2 * noise)
      elif "embed_tokens" in name:
        p.copy_(gain * noise)
      else:
        p.copy_(gain * noise / math.sqrt(p.shape[-1]))
  return model


class Checkpoint(NamedTuple):
  config: Any
  torch_model: Any
  folder: pathlib.Path


def save_checkpoint(cfg, folder: pathlib.Path, seed: int = 0, gain: float = 1.0) -> Checkpoint:
  """A random ``*ForCausalLM`` saved with ``save_pretrained`` (safetensors), in eval mode."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(seed)
  model = randomize(transformers.AutoModelForCausalLM.from_config(cfg), seed, gain).eval()
  model.save_pretrained(folder)
  return Checkpoint(cfg, model, folder)


def mixed_batch(cfg, lengths=(9, 5, 2), seq=9, seed=0, side="right"):
  """Random sequences of ``lengths`` padded (id 0) on ``side`` to ``seq``, and the mask; the
  same sequences whichever the side."""
  rng = np.random.RandomState(seed)
  ids = np.zeros((len(lengths), seq), np.int64)
  mask = np.zeros((len(lengths), seq), np.int64)
  for i, n in enumerate(lengths):
    where = slice(0, n) if side == "right" else slice(seq - n, seq)
    ids[i, where], mask[i, where] = rng.randint(1, cfg.vocab_size, n), 1
  return ids, mask


def torch_logits(model, ids, mask, position_ids=None):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = model(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=None if position_ids is None else torch.tensor(position_ids),
    )
  return out.logits.float().numpy()


def max_error(ours, ref, mask) -> float:
  keep = np.asarray(mask, bool)
  return float(np.abs(np.asarray(ours, np.float32)[keep] - np.asarray(ref)[keep]).max())


def randomize_adapters(params, seed: int, scale: float = 0.3):
  """Every lora_a/lora_b replaced by N(0, scale^2) (``scale=0``: a fresh, zero adapter)."""
  from lora_jax._src import paths

  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.RandomState(seed)
  out = []
  for kp, leaf in leaves:
    if paths.keypath_str(kp).rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
      leaf = (scale * rng.randn(*leaf.shape)).astype(np.float32)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def adapted(module, variables, rule, seed: int = 1, scale: float = 0.2):
  """``variables`` with random (non-zero) adapters by ``rule``, scanned layers included; built
  on shapes and filled with numpy, so nothing is compiled."""
  from helpers import with_numpy_adapters

  import lora_jax

  layouts = lora_jax.kernel_layouts(module, jax.numpy.ones((1, 2), jax.numpy.int32))
  return with_numpy_adapters(variables, rule, seed, layouts, scale)
