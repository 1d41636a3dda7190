"""PEFT's ``adapter_config.json``: the file names, ``LoraConfig``'s defaults, the options
lora_jax cannot reproduce, and PEFT's ``rank_pattern`` / ``alpha_pattern`` rules."""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"


WEIGHTS_NAME = "adapter_model.safetensors"


TORCH_WEIGHTS_NAME = "adapter_model.bin"


KEY_PREFIX = "base_model.model."


PEFT_VERSION = "0.21.2"  # the PEFT release whose file format this module writes


TASK_TYPES = (
  None,
  "SEQ_CLS",
  "SEQ_2_SEQ_LM",
  "CAUSAL_LM",
  "TOKEN_CLS",
  "QUESTION_ANS",
  "FEATURE_EXTRACTION",
)


# transformers' causal LMs' output layer: with tied word embeddings and ensure_weight_tying, PEFT
# adapts it with the embedding's factors (transposed) and saves them under this name too
TIED_OUTPUT = "lm_head"

# ``LoraConfig().to_dict()`` of PEFT 0.21.2, as ``save_pretrained`` writes it (inference mode).
PEFT_DEFAULTS: dict[str, Any] = {
  "alora_invocation_tokens": None,
  "alpha_pattern": {},
  "arrow_config": None,
  "auto_mapping": None,
  "base_model_name_or_path": None,
  "bias": "none",
  "corda_config": None,
  "ensure_weight_tying": False,
  "eva_config": None,
  "exclude_modules": None,
  "fan_in_fan_out": False,
  "inference_mode": True,
  "init_lora_weights": True,
  "kasa_config": None,
  "layer_replication": None,
  "layers_pattern": None,
  "layers_to_transform": None,
  "loftq_config": {},
  "lora_alpha": 8,
  "lora_bias": False,
  "lora_dropout": 0.0,
  "lora_ga_config": None,
  "megatron_config": None,
  "megatron_core": "megatron.core",
  "modules_to_save": None,
  "monteclora_config": None,
  "peft_type": "LORA",
  "peft_version": PEFT_VERSION,
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": None,
  "target_modules": None,
  "target_parameters": None,
  "task_type": None,
  "trainable_token_indices": None,
  "use_bdlora": None,
  "use_dora": False,
  "use_qalora": False,
  "use_rslora": False,
  "velora_config": None,
}


# Options lora_jax cannot reproduce: key -> (what it is, the values lora_jax accepts).
UNSUPPORTED: dict[str, tuple[str, tuple]] = {
  "bias": ("trained biases", ("none", None)),
  "lora_bias": ("a bias on lora_B", (False, None)),
  "fan_in_fan_out": ("transposed (Conv1D) base weights", (False, None)),
  "layer_replication": ("layer replication", (None, [])),
  "trainable_token_indices": ("trainable tokens", (None, [], {})),
  "target_parameters": ("adapters on bare nn.Parameters", (None, [])),
  "use_qalora": ("QALoRA", (False, None)),
  "alora_invocation_tokens": ("activated LoRA", (None, [])),
  "use_bdlora": ("block-diagonal LoRA", (None, False, {})),
  "arrow_config": ("Arrow routing", (None, {})),
  "kasa_config": ("KaSA", (None, {})),
  "monteclora_config": ("MonteCLoRA", (None, {})),
  "velora_config": ("VeLoRA", (None, {})),
  "megatron_config": ("Megatron layers", (None, {})),
}


# ``init_lora_weights`` values that leave the base weights as they are; the others (PiSSA,
# CorDA, OLoRA, LoftQ, LoRA-GA) rewrite them, so the adapter only fits the rewritten base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def most_common(values) -> Any:
  counts = collections.Counter(values)
  return max(counts, key=lambda v: (counts[v], -float(v)))


def number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
  """``rank_pattern``-style overrides: a module's last name where its whole group agrees.

  PEFT matches a key ``k`` against a module name with ``re.match(rf"(.*\\.)?({k})$", name)``.
  """
  groups: dict[str, list[str]] = collections.defaultdict(list)
  for name in values:
    groups[name.rsplit(".", 1)[-1]].append(name)
  out = {}
  for short, names in sorted(groups.items()):
    distinct = {values[n] for n in names}
    if distinct == {default}:
      continue
    if len(distinct) == 1:
      out[re.escape(short)] = number(values[names[0]])
    else:
      out.update({re.escape(n): number(values[n]) for n in sorted(names) if values[n] != default})
  return out


def target_modules(adapted: list[str], candidates: list[str]) -> list[str]:
  """Short module names (``["query", "value"]``) if they pick exactly the adapted modules."""
  short = {n.rsplit(".", 1)[-1] for n in adapted}
  picked = {c for c in candidates if c.rsplit(".", 1)[-1] in short}
  return sorted(short) if picked == set(adapted) else sorted(adapted)


def read_config(folder: Path) -> dict:
  path = folder / CONFIG_NAME
  if not path.exists():
    found = sorted(p.name for p in folder.iterdir())
    hint = ""
    if any(_is_step_dir(folder / f) for f in found):
      hint = "; it looks like a lora_jax adapter: load it with lora_jax.load_adapter"
    raise FileNotFoundError(
      f"{str(folder)!r} is not a PEFT adapter folder: no {CONFIG_NAME} (found {found[:10]}){hint}"
    )
  try:
    cfg = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{str(path)!r} is not valid JSON ({e}); the file is damaged") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{str(path)!r} holds {type(cfg).__name__}, not a JSON object")
  return cfg


def _is_step_dir(path: Path) -> bool:
  return path.is_dir() and path.name.isdigit() and (path / "lora_jax").exists()


def check_supported(cfg: Mapping, source: str) -> None:
  peft_type = cfg.get("peft_type", "LORA")
  if peft_type != "LORA":
    raise ValueError(
      f"{source} has peft_type={peft_type!r}; import_peft reads LoRA adapters only "
      "(peft_type='LORA')"
    )
  bad = []
  for key, (what, ok) in UNSUPPORTED.items():
    value = cfg.get(key)
    if not _accepted(value, ok):
      bad.append(f"{key}={value!r} ({what}; supported: {list(ok)})")
  if not _accepted(cfg.get("use_dora"), (False, True, None)):
    bad.append(f"use_dora={cfg.get('use_dora')!r} (DoRA; supported: [False, True, None])")
  init = cfg.get("init_lora_weights", True)
  if not _accepted(init, PLAIN_INITS):
    bad.append(
      f"init_lora_weights={init!r} (this initialisation rewrites the base weights, so the "
      f"adapter fits only the rewritten base; supported: {list(PLAIN_INITS)}; PEFT converts "
      "such adapters to plain LoRA with save_pretrained(path_initial_model_for_weight_conversion"
      "=...))"
    )
  if bad:
    raise ValueError(
      f"{source} uses PEFT options that lora_jax cannot reproduce: " + "; ".join(bad)
    )


def _accepted(value: Any, ok: tuple) -> bool:
  """``value in ok``, except that ``0``/``1`` do not pass for ``False``/``True``."""
  return any(value is o if isinstance(o, bool) or o is None else value == o for o in ok)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's ``get_pattern_key``: the first key ``k`` with ``(.*\\.)?(k)$`` matching ``name``."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default
