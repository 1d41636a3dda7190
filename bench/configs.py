"""Named benchmark configurations: a RoBERTa-shaped encoder, a batch shape and what trains.

A name is ``<model>-<seq>x<batch>`` (LoRA r=8, alpha=16 on ``query``/``value``, classifier
trained, as in the LoRA paper's GLUE runs) with an optional suffix: ``-all`` adapts every
encoder linear (``query``, ``key``, ``value``, ``attention/output/dense``,
``intermediate/dense``, ``output/dense``; the classifier head stays fully trainable) and
``-full`` is full fine-tuning for reference. Groups: ``cpu`` (small, seconds per step on two
cores), ``gpu`` (the sizes of the PEFT anchors in ``../shared/bench``) and ``all``.

Causal LMs (a Llama-family decoder, next-token loss on every real token, scanned layers) are
named ``<model>-<seq>x<batch>-packed`` (each row packs random-length sequences, told apart by
segment ids; no padding) or ``-padded`` (one random-length sequence per row, padded on the
right): LoRA r=16, alpha=32 on all seven linears of every layer (``q_proj`` ... ``down_proj``),
as the PEFT anchor ``llama-1.1B 1024x8``. Groups ``llm`` (all of them), ``llm-cpu``.

Weights are random (speed does not depend on their values); both benchmark sides build the
model from the same transformers config (:func:`hf_config`).
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
# The seven linears of a Llama-family layer (the lm_head is not adapted), and their LoRA.
LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLM_RANK = 16
LLM_ALPHA = 32
BATCH_KINDS = ("packed", "padded")
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
  "loss_chunk",
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
class Decoder:
  """The shape of a Llama-family causal LM (fields as in ``transformers.LlamaConfig``)."""

  name: str
  hidden: int
  layers: int
  heads: int
  kv_heads: int
  ffn: int
  vocab: int
  tied: bool = False  # tie_word_embeddings
  max_positions: int = 4096


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """One benchmark row: model, ``seq x batch`` tokens per step, and what trains."""

  name: str
  model: Model | Decoder
  seq: int
  batch: int
  mode: str  # "lora" or "full"
  targets: tuple[str, ...] | None  # LoRA target module names; None for full fine-tuning
  rank: int = RANK
  alpha: int = ALPHA
  batch_kind: str | None = None  # causal LMs: "packed" or "padded"

  @property
  def tokens(self) -> int:
    return self.seq * self.batch

  @property
  def is_llm(self) -> bool:
    return isinstance(self.model, Decoder)

  def describe(self) -> str:
    m = self.model
    if self.mode == "full":
      what = "full fine-tuning"
    elif self.targets in (ALL_LINEAR_TARGETS, LLM_TARGETS):
      what = f"LoRA r={self.rank} on all {'layer' if self.is_llm else 'encoder'} linears"
    else:
      what = f"LoRA r={self.rank} on {','.join(self.targets)}"
    heads = f"{m.heads}/{m.kv_heads}" if self.is_llm else m.heads
    shape = f"seq {self.seq} x batch {self.batch}"
    return (
      f"{m.name} (L={m.layers}, d={m.hidden}, heads={heads}, ffn={m.ffn}, vocab={m.vocab}), "
      f"{shape}{f' {self.batch_kind}' if self.batch_kind else ''}, {what}"
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
DECODERS = {
  m.name: m
  for m in (
    # Llama-shaped toy: the smoke test's causal LM
    Decoder("llama-tiny", hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256),
    # HuggingFaceTB/SmolLM2-135M
    Decoder(
      "smollm2-135m",
      hidden=576,
      layers=30,
      heads=9,
      kv_heads=3,
      ffn=1536,
      vocab=49152,
      tied=True,
      max_positions=8192,
    ),
    # TinyLlama/TinyLlama-1.1B (the PEFT anchor's llama-1.1B)
    Decoder(
      "llama-1.1b",
      hidden=2048,
      layers=22,
      heads=32,
      kv_heads=4,
      ffn=5632,
      vocab=32000,
      max_positions=2048,
    ),
    # meta-llama/Llama-2-7b-hf: for compiled-memory figures (bench/llm_memory.py)
    Decoder("llama-7b", hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000),
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


_LLM_SHAPES = (
  ("llama-tiny", 64, 4, ("llm-cpu",)),
  ("smollm2-135m", 256, 4, ("llm-cpu",)),
  ("llama-1.1b", 1024, 8, ("gpu",)),
  ("llama-7b", 2048, 1, ()),
)


def _build() -> tuple[dict[str, BenchConfig], dict[str, tuple[str, ...]]]:
  configs: dict[str, BenchConfig] = {}
  groups: dict[str, list[str]] = {"cpu": [], "gpu": [], "llm": [], "llm-cpu": [], "all": []}
  for model, seq, batch, group in _SHAPES:
    for suffix, mode, targets in _VARIANTS:
      name = f"{model}-{seq}x{batch}{suffix}"
      configs[name] = BenchConfig(name, MODELS[model], seq, batch, mode, targets)
      groups[group].append(name)
      groups["all"].append(name)
  for model, seq, batch, extra in _LLM_SHAPES:
    for kind in BATCH_KINDS:
      name = f"{model}-{seq}x{batch}-{kind}"
      configs[name] = BenchConfig(name, DECODERS[model], seq, batch, "lora", LLM_TARGETS,
                                  LLM_RANK, LLM_ALPHA, kind)  # fmt: skip
      for group in ("llm", *extra, "all"):
        groups[group].append(name)
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
    ValueError: unknown configuration 'tiny'; groups: all, cpu, gpu, llm, llm-cpu; ...
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
  """The ``transformers.RobertaConfig`` (or ``LlamaConfig``) both sides build their model from,
  as a plain dict.

  ``opts`` supplies ``hidden_act`` (RoBERTa's is ``"gelu"``, the exact erf form),
  ``hidden_dropout`` and ``attn_dropout`` (attention-probability dropout; PEFT side only). The
  parent process builds it and hands it to both workers, so the lora_jax worker never imports
  transformers (which would import PyTorch and add its memory to the JAX process).
  """
  import transformers  # deferred: --help needs no transformers

  m = cfg.model
  if cfg.is_llm:  # the opts above are the encoder's; a Llama has no dropout to set
    return transformers.LlamaConfig(
      vocab_size=m.vocab,
      hidden_size=m.hidden,
      num_hidden_layers=m.layers,
      num_attention_heads=m.heads,
      num_key_value_heads=m.kv_heads,
      intermediate_size=m.ffn,
      max_position_embeddings=m.max_positions,
      tie_word_embeddings=m.tied,
    ).to_dict()
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
