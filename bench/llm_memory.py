"""Memory of the LLM benchmark configurations' LoRA step, from shapes alone.

For each configuration of ``bench/configs.py`` (``--configs``, default: every packed one) and
each base (``--bases``: ``bf16``; ``nf4``: every linear kernel but the ``lm_head`` in NF4 with
double quantization, as ``bench/qlora_memory.py``), the step of ``bench/llm_jax.py`` (bf16 compute,
float32 adapters and AdamW state, scanned layers, remat unless ``--no-remat``) is lowered and
compiled for the CPU on ``jax.ShapeDtypeStruct`` arguments, so nothing of the model is
allocated. Reported: XLA's ``memory_analysis()`` (arguments, outputs, donated aliases,
temporaries; the plan's peak = arguments + outputs - aliases + temporaries), beside a simple
model of what the step should need (:func:`expected`).

Each (configuration, base, XLA flags) runs in a fresh process. ``--xla_variants`` adds plans
compiled with other ``XLA_FLAGS``: ``no-licm`` disables XLA's while-loop-invariant code motion,
which on XLA:CPU hoists the float32 copy of every stacked bf16 kernel out of the layer loop
(XLA:CPU has no bf16 matmul and upcasts its operands; a GPU multiplies bf16 natively).

Usage (repository root; about two minutes on two cores):
  python bench/llm_memory.py --out bench/results/llm_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``lora_jax`` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import configs  # noqa: E402
from lora_jax.models.layers.attention import QUERY_CHUNK  # noqa: E402

GIB = 1024**3
REPO = pathlib.Path(__file__).resolve().parent.parent
BASES = ("bf16", "nf4")
ATTENTION = ("xla", "xla_chunked")  # the CPU's (cuDNN needs a GPU)
XLA_VARIANTS = {
  "default": "",
  "no-licm": "--xla_disable_hlo_passes=while-loop-invariant-code-motion",
}
# packed batches of every LLM shape (padded ones plan within a few MiB of them)
DEFAULT = ",".join(n for n in configs.GROUPS["llm"] if n.endswith("-packed"))


def expected(
  cfg: configs.BenchConfig,
  base_bytes: int,
  lora_params: int,
  remat: bool,
  attention: str = "xla",
  loss_chunk: int = 0,
) -> dict:
  """The simple model of the step's memory, in bytes.

  * ``base``: the frozen weights as stored; ``lora``: adapters, their gradients and AdamW's two
    moments, float32 (``16`` bytes per adapter parameter);
  * ``activations``: with remat, each layer's input (``B S d``, bf16) kept for the backward
    pass plus one layer's backward working set; without, every layer's working set. A
    layer's working set: the attention scores, probabilities and their gradient in float32
    (``3 B H q S x 4`` bytes for ``q`` queries at once: all ``S`` with ``"xla"``, a block of
    ``QUERY_CHUNK`` with ``"xla_chunked"``) and the layer's bf16 intermediates
    (``B S (8 d + 4 ffn) x 2``);
  * ``logits``: float32 logits, their softmax and gradient for ``n`` tokens at once
    (``3 n V x 4``; ``n = B S``, or ``loss_chunk`` with the fused cross-entropy).

  Example:
    >>> e = expected(configs.CONFIGS["llama-7b-2048x1-packed"], 13476831232, 39976960, True)
    >>> round(e["total"] / GIB, 2), round(e["activations"] / GIB, 2)
    (16.17, 2.29)
    >>> e = expected(configs.CONFIGS["llama-7b-2048x1-packed"], 13476831232, 39976960, True,
    ...              "xla_chunked", 1024)
    >>> round(e["total"] / GIB, 2), round(e["activations"] / GIB, 2)
    (14.68, 1.17)
  """
  m, b, s = cfg.model, cfg.batch, cfg.seq
  queries = min(s, QUERY_CHUNK) if attention == "xla_chunked" else s
  layer = 3 * b * m.heads * queries * s * 4 + b * s * (8 * m.hidden + 4 * m.ffn) * 2
  kept = m.layers * b * s * m.hidden * 2
  acts = kept + layer if remat else m.layers * layer
  tokens = min(b * s, loss_chunk) if loss_chunk else b * s
  out = {
    "base": base_bytes,
    "lora": 16 * lora_params,
    "activations": acts,
    "logits": 3 * tokens * m.vocab * 4,
  }
  return {**out, "total": sum(out.values())}


def plan(name: str, base: str, remat: bool = True, attention: str = "xla") -> dict:
  """XLA's buffer plan of the compiled step (this process's ``XLA_FLAGS``) and the model."""
  import jax
  import jax.numpy as jnp

  import lora_jax
  from bench import llm_jax
  from bench import qlora_memory

  if base not in BASES:
    raise ValueError(f"unknown base {base!r}; valid: {', '.join(BASES)}")
  cfg = configs.CONFIGS[name]
  module = llm_jax.make_module(configs.hf_config(cfg, {}), dtype=jnp.bfloat16,
                               param_dtype=jnp.bfloat16, remat=remat,
                               attention=attention)  # fmt: skip
  layout = llm_jax.layouts(module)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
  if base == "nf4":
    shapes = lora_jax.quantize(shapes, "all-linear", kind="nf4", double_quant=True,
                               layouts=layout)  # fmt: skip
  trainable, frozen, tx = llm_jax.adapt(shapes, layout, cfg, key=jax.random.key(0))
  opt_state = jax.eval_shape(tx.init, trainable)
  step = jax.jit(llm_jax.make_step(module, tx), donate_argnums=(0, 1))
  args = (trainable, opt_state, frozen, llm_jax.batch_shapes(cfg), jnp.zeros((), jnp.int32))
  m = step.lower(*args).compile().memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  peak += m.temp_size_in_bytes
  lora_params = sum(x.size for x in jax.tree.leaves(trainable))
  base_bytes = qlora_memory.tree_bytes(frozen)
  return {
    "config": name,
    "base": base,
    "remat": remat,
    "attention": attention,
    "seq": cfg.seq,
    "batch": cfg.batch,
    "rank": cfg.rank,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "backend": jax.default_backend(),
    "base_bytes": base_bytes,
    "lora_params": lora_params,
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "peak_bytes": int(peak),
    "expected_bytes": expected(cfg, base_bytes, lora_params, remat, attention, llm_jax.LOSS_CHUNK),
  }


def run_one(name: str, base: str, variant: str, remat: bool, attention: str = "xla") -> dict:
  """:func:`plan` in a fresh process with the variant's ``XLA_FLAGS``."""
  env = {**os.environ, "XLA_FLAGS": XLA_VARIANTS[variant], "JAX_PLATFORMS": "cpu"}
  job = json.dumps({"name": name, "base": base, "remat": remat, "attention": attention})
  cmd = [sys.executable, "-m", "bench.llm_memory", "--one", job]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    return {"config": name, "base": base, "xla": variant, "attention": attention,
            "error": proc.stderr[-500:]}  # fmt: skip
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "xla": variant}


def gib(x) -> str:
  """Bytes as GiB, three decimals (the tables' cells)."""
  return f"{x / GIB:.3f}"


def markdown(rows: list[dict]) -> str:
  """The table of docs/benchmarks.md: GiB of XLA's plan beside the model."""
  head = ("| config | base | attention | XLA:CPU flags | arguments | outputs | aliased "
          "| temporaries | peak (plan) | model: base + LoRA/Adam + activations + logits = total "
          "|")  # fmt: skip
  lines = [head, "|" + " --- |" * 10]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['config']} | {r['base']} | {r['attention']} | {r['xla']} | error |"
                   + " |" * 5)  # fmt: skip
      continue
    e = r["expected_bytes"]
    model = " + ".join(gib(e[k]) for k in ("base", "lora", "activations", "logits"))
    cells = [r["config"], r["base"], r["attention"], r["xla"], *(gib(r[k]) for k in (
      "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")),
      f"**{gib(r['peak_bytes'])}**", f"{model} = {gib(e['total'])}"]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def report(rows: list[dict], markdown, out: pathlib.Path | None) -> int:
  """Prints ``markdown(rows)``, writes ``rows`` as JSON to ``out`` (if given); the exit status:
  1 if a plan failed."""
  print(markdown(rows))
  if out:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
  return 1 if any("error" in r for r in rows) else 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default=DEFAULT, help="comma list of LLM configurations / groups")
  p.add_argument("--bases", default="bf16,nf4", help=f"comma list from {list(BASES)}")
  p.add_argument("--xla_variants", default="default,no-licm", help=f"from {list(XLA_VARIANTS)}")
  p.add_argument(
    "--attention",
    default="xla,xla_chunked",
    help=f"comma list of lora_jax attention implementations from {list(ATTENTION)}",
  )
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
  p.add_argument("--one", help=argparse.SUPPRESS)  # worker: one plan, printed as JSON
  args = p.parse_args(argv)
  if args.one:
    job = json.loads(args.one)
    print(json.dumps(plan(job["name"], job["base"], job["remat"], job["attention"])))
    return 0
  cfgs = [c for c in configs.resolve(args.configs) if c.is_llm]
  if not cfgs:
    p.error(f"--configs {args.configs!r} names no LLM configuration; see bench/configs.py")
  bases = args.bases.split(",")
  variants = args.xla_variants.split(",")
  attentions = args.attention.split(",")
  bad = [b for b in bases if b not in BASES] + [v for v in variants if v not in XLA_VARIANTS]
  bad += [a for a in attentions if a not in ATTENTION]
  if bad:
    p.error(f"unknown {bad}; bases: {list(BASES)}, xla variants: {list(XLA_VARIANTS)}, "
            f"attention: {list(ATTENTION)}")  # fmt: skip
  rows = []
  for cfg in cfgs:
    for base in bases:
      for attention in attentions:
        for variant in variants:
          rows.append(run_one(cfg.name, base, variant, args.remat, attention))
          print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
  return report(rows, markdown, args.out)


if __name__ == "__main__":
  sys.exit(main())
