"""Named benchmark configurations: a RoBERTa-shaped encoder, a batch shape and what trains.

A name is ``<model>-<seq>x<batch>`` (LoRA r=8, alpha=16 on ``query``/``value``, classifier
trained, as in the LoRA paper's GLUE runs) with an optional suffix: ``-all`` adapts every
encoder linear (``query``, ``key``, ``value``, ``attention/output/dense``,
``intermediate/dense``, ``output/dense``; the classifier head stays fully trainable) and
``-full`` is full fine-tuning for reference. Groups: ``cpu`` (small, seconds per step on two
cores), ``gpu`` (the sizes of the PEFT anchors in ``../shared/bench``) and ``all``.

Weights are random (speed does not depend on their values); both benchmark sides build the
model from the same ``transformers.RobertaConfig`` (:func:`hf_config`).
"""

from __future__ import annotations

import dataclasses

MODES = ("lora", "full")
QV_TARGETS = ("query", "value")
# Module-name suffixes, the same spelling for lora_jax.LoraRule and peft.LoraConfig: together
# they match the six linears of every layer and not the classifier's dense / out_proj.
ALL_LINEAR_TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")
RANK = 8
ALPHA = 16
# Command-line options that shape a measurement; every result row records them.
ROW_OPTIONS = (
  "dtype",
  "base_dtype",
  "steps",
  "warmup",
  "hidden_act",
  "hidden_dropout",
  "lora_dropout",
  "attn_dropout",
  "remat",
  "attention",
  "donate",
  "xla_flags",
  "prng",
  "lockstep",
  "cpus",
  "seed",
)


@dataclasses.dataclass(frozen=True)
class Model:
  """The shape of a RoBERTa-style encoder (fields as in ``transformers.RobertaConfig``)."""

  name: str
  hidden: int
  layers: int
  heads: int
  ffn: int
  vocab: int = 50265
  labels: int = 2
  max_positions: int = 514


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark row: model, ``seq x batch`` tokens per step, and what trains."""

  name: str
  model: Model
  seq: int
  batch: int
  mode: str  # "lora" or "full"
  targets: tuple[str, ...] | None  # LoRA target module names; None for full fine-tuning

  @property
  def tokens(self) -> int:
    return self.seq * self.batch

  def describe(self) -> str:
    m = self.model
    if self.mode == "full":
      what = "full fine-tuning"
    elif self.targets == ALL_LINEAR_TARGETS:
      what = f"LoRA r={RANK} on all encoder linears"
    else:
      what = f"LoRA r={RANK} on {','.join(self.targets)}"
    return (
      f"{m.name} (L={m.layers}, d={m.hidden}, heads={m.heads}, ffn={m.ffn}, vocab={m.vocab}), "
      f"seq {self.seq} x batch {self.batch}, {what}"
    )


MODELS = {
  m.name: m
  for m in (
    # roberta-shaped toy: the smoke test's model, milliseconds per step on a CPU
    Model("tiny", hidden=128, layers=2, heads=2, ffn=512, vocab=1000),
    # prajjwal1/bert-mini sizes with RoBERTa's vocabulary
    Model("mini", hidden=256, layers=4, heads=4, ffn=1024),
    Model("roberta-base", hidden=768, layers=12, heads=12, ffn=3072),
    Model("roberta-large", hidden=1024, layers=24, heads=16, ffn=4096),
  )
}

_SHAPES = (
  ("tiny", 64, 8, "cpu"),
  ("mini", 128, 16, "cpu"),
  ("roberta-base", 128, 32, "gpu"),
  ("roberta-large", 128, 32, "gpu"),
  ("roberta-large", 512, 16, "gpu"),
)
_VARIANTS = (
  ("", "lora", QV_TARGETS),
  ("-all", "lora", ALL_LINEAR_TARGETS),
  ("-full", "full", None),
)


def _build() -> tuple[dict[str, BenchConfig], dict[str, tuple[str, ...]]]:
  configs: dict[str, BenchConfig] = {}
  groups: dict[str, list[str]] = {"cpu": [], "gpu": [], "all": []}
  for model, seq, batch, group in _SHAPES:
    for suffix, mode, targets in _VARIANTS:
      name = f"{model}-{seq}x{batch}{suffix}"
      configs[name] = BenchConfig(name, MODELS[model], seq, batch, mode, targets)
      groups[group].append(name)
      groups["all"].append(name)
  return configs, {k: tuple(v) for k, v in groups.items()}


CONFIGS, GROUPS = _build()


def resolve(spec: str) -> list[BenchConfig]:
  """Comma-separated configuration names and/or group names -> configurations, in order.

  Example:
    >>> [c.name for c in resolve("tiny-64x8,mini-128x16-full")]
    ['tiny-64x8', 'mini-128x16-full']
    >>> resolve("tiny")
    Traceback (most recent call last):
    ...
    ValueError: unknown configuration 'tiny'; groups: all, cpu, gpu; configurations: ...
  """
  out: list[BenchConfig] = []
  for item in (s.strip() for s in spec.split(",")):
    if not item:
      continue
    if item in GROUPS:
      names = GROUPS[item]
    elif item in CONFIGS:
      names = (item,)
    else:
      raise ValueError(
        f"unknown configuration {item!r}; groups: {', '.join(sorted(GROUPS))}; "
        f"configurations: {', '.join(CONFIGS)}"
      )
    out.extend(CONFIGS[n] for n in names if CONFIGS[n] not in out)
  if not out:
    raise ValueError(f"no configuration named in {spec!r}; choose from {', '.join(CONFIGS)}")
  return out


def help_text() -> str:
  """One line per configuration and group, for ``--help``."""
  lines = [f"  {name}: {cfg.describe()}" for name, cfg in CONFIGS.items()]
  lines += [f"  {g} (group): {', '.join(names)}" for g, names in GROUPS.items() if g != "all"]
  lines.append("  all (group): every configuration above")
  return "\n".join(lines)


def hf_config(cfg: BenchConfig, opts: dict) -> dict:
  """The ``transformers.RobertaConfig`` both sides build their model from, as a plain dict.

  ``opts`` supplies ``hidden_act`` (RoBERTa's is ``"gelu"``, the exact erf form),
  ``hidden_dropout`` and ``attn_dropout`` (attention-probability dropout; PEFT side only). The
  parent process builds it and hands it to both workers, so the lora_jax worker never imports
  transformers (which would import PyTorch and add its memory to the JAX process).
  """
  import transformers  # deferred: --help needs no transformers

  m = cfg.model
  config = transformers.RobertaConfig(
    vocab_size=m.vocab,
    hidden_size=m.hidden,
    num_hidden_layers=m.layers,
    num_attention_heads=m.heads,
    intermediate_size=m.ffn,
    max_position_embeddings=m.max_positions,
    type_vocab_size=1,
    num_labels=m.labels,
    hidden_act=opts["hidden_act"],
    hidden_dropout_prob=opts["hidden_dropout"],
    attention_probs_dropout_prob=opts["attn_dropout"],
  )
  return {**config.to_dict(), "num_labels": config.num_labels}
