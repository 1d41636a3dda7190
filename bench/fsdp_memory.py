"""Memory per device of run_clm.py's LoRA step over a mesh, frozen base sharded, from shapes alone.

The step ``train/run_clm.py --parallel mesh --shard_frozen`` compiles: ``train.engine.step``'s
train step on ``train.tasks.clm.task.CausalLM``'s loss (logits at the target positions only, the
fused cross-entropy), placed by ``train.engine.parallel.Parallel("mesh", shard_frozen=True)``:
state (float32 adapters, AdamW moments) replicated and donated, the global batch sharded on the
``"data"`` axis (``batch`` rows of ``bench/configs.py``'s configuration per device, packed as
``bench/llm_batch.py``), every frozen leaf split on its largest axis divisible by the device
count (``_fsdp_spec``; leaves under 64k elements replicated). The decoder and its LoRA are
``bench/llm_memory.py``'s: bf16 base (or NF4 with double quantization on every linear but the
``lm_head``: ``--bases``), bf16 compute, scanned layers, remat, LoRA r=16 on the seven linears.

Each plan is lowered on ``jax.ShapeDtypeStruct`` arguments carrying those shardings and compiled
for ``--devices`` forced host (CPU) devices in a fresh process
(``XLA_FLAGS=--xla_force_host_platform_device_count=N`` plus the variant's flags, set before
jax is imported), so nothing of the model is allocated. XLA's ``memory_analysis()`` of an SPMD
program is per device: arguments, outputs, donated aliases, temporaries and the plan's peak
(arguments + outputs - aliases + temporaries), beside :func:`expected`.

Usage (repository root; about six minutes on two cores: 16 plans of 3 to 17 s of compile each):
  python bench/fsdp_memory.py --out bench/results/fsdp_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``bench``, ``train``, ``lora_jax`` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import configs  # noqa: E402
from bench import llm_memory  # noqa: E402
from bench.llm_memory import XLA_VARIANTS  # noqa: E402
from bench.llm_memory import gib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DEVICES = 8
DEFAULT = "llama-7b-2048x1-packed"
LOSS_CHUNK = 256  # the decoder's default loss_chunk_size, which CausalLM's loss keeps


def bench_config(name: str, model: dict | None = None) -> configs.BenchConfig:
  """``bench/configs.py``'s configuration, its decoder's fields replaced by ``model``."""
  cfg = configs.CONFIGS[name]
  if model:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
  return cfg


def clm_batch(cfg: configs.BenchConfig, rows: int) -> dict:
  """A global batch of ``rows`` packed rows with run_clm.py's keys (``train.data.clm``: ids,
  mask, segments, token weights and the listed next-token targets), NumPy."""
  from bench import llm_batch
  from train.data import clm as clm_data

  b = llm_batch.make_batch(cfg.seq, rows, cfg.model.vocab, cfg.batch_kind, seed=0)
  weights = (b["segment_ids"] > 0).astype("float32")
  batch = {k: b[k] for k in ("input_ids", "attention_mask", "segment_ids")}
  batch["weights"] = weights
  return batch | clm_data.targets(b["input_ids"], b["segment_ids"], weights)


def held_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s."""
  import jax
  import numpy as np

  total = 0
  for x in jax.tree.leaves(tree):
    total += int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def layer_bytes(frozen, layers: int) -> int:
  """Bytes of one decoder layer's frozen weights in bf16 (the compute dtype), one slice of the
  stacked leaves: what each device forms when it gathers a layer's kernels (NF4 kernels: once
  their gathered codes are dequantized)."""
  import jax
  import numpy as np

  import lora_jax

  quantized = lambda x: isinstance(x, lora_jax.QuantizedArray)  # noqa: E731
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(frozen, is_leaf=quantized):
    if "'layers'" in jax.tree_util.keystr(path):
      total += int(np.prod(x.layer_shape)) * layers if quantized(x) else int(np.prod(x.shape))
  return 2 * total // layers


def _elements(shape: str) -> int:
  """Elements of an HLO shape such as ``f32[8,2048,4096]``."""
  dims = [int(d) for d in re.findall(r"\d+", shape.split("[", 1)[1])]
  return int(math.prod(dims))


def collectives(hlo: str, top: int = 8) -> dict[str, int]:
  """``{"all-gather f32[4096,4096]": count, ...}``: the compiled program's ``top`` largest
  collectives (by their output's elements), from its HLO text."""
  found = re.findall(r"= (\w+\[[\d,]*\])\S* (all-gather|all-reduce|reduce-scatter)\(", hlo)
  counts: dict[str, int] = {}
  for shape, op in found:
    counts[f"{op} {shape}"] = counts.get(f"{op} {shape}", 0) + 1
  return dict(sorted(counts.items(), key=lambda kv: -_elements(kv[0]))[:top])


def expected(
  cfg, base_held: int, lora_params: int, layer: int, attention: str, sharded: bool
) -> dict:
  """The simple model of one device's memory, in bytes.

  ``base``: this device's share of the frozen weights (sharded leaves / n, small replicated leaves
  whole); ``lora`` (replicated), ``activations`` and ``logits`` as
  :func:`bench.llm_memory.expected` for the configuration's ``batch`` rows (one device's);
  ``gathered``, where the base is ``sharded``: what FSDP adds, one layer's kernels gathered whole
  (:func:`layer_bytes`, bf16) inside the scanned loop, twice (the next layer's gather beside the
  current one, or the backward pass's recomputed forward beside its gradient).

  Example:
    >>> e = expected(configs.CONFIGS["llama-7b-2048x1-packed"], 1684611072, 39976960,
    ...              404783104, "xla_chunked", True)
    >>> round(e["total"] / llm_memory.GIB, 2), round(e["gathered"] / llm_memory.GIB, 2)
    (4.18, 0.75)
  """
  e = llm_memory.expected(cfg, base_held, lora_params, True, attention, LOSS_CHUNK)
  del e["total"]
  out = {**e, "gathered": 2 * layer if sharded else 0}
  return {**out, "total": sum(out.values())}


def _model(cfg: configs.BenchConfig, base: str, attention: str):
  """``(module, trainable, frozen)`` shapes, as ``bench/llm_memory.py`` builds them."""
  import jax
  import jax.numpy as jnp

  import lora_jax
  from bench import llm_jax

  hf = configs.hf_config(cfg, {})
  module = llm_jax.make_module(hf, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True,
                               attention=attention)  # fmt: skip
  layout = llm_jax.layouts(module)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
  if base == "nf4":
    shapes = lora_jax.quantize(shapes, "all-linear", kind="nf4", double_quant=True,
                               layouts=layout)  # fmt: skip
  trainable, frozen, _ = llm_jax.adapt(shapes, layout, cfg, key=jax.random.key(0))
  return module, trainable, frozen


def plan(job: dict) -> dict:
  """XLA's per-device buffer plan of the mesh step (this process's devices and ``XLA_FLAGS``).

  ``job``: ``config``, ``base``, ``attention``, ``shard_frozen`` and optionally ``model`` (decoder
  fields to replace, for the tests).
  """
  import jax

  import lora_jax
  from train.engine import parallel as par
  from train.engine import state as state_lib
  from train.engine import step as step_lib
  from train.tasks.clm.task import CausalLM

  cfg = bench_config(job["config"], job.get("model"))
  module, trainable, frozen = _model(cfg, job["base"], job["attention"])
  schedule = state_lib.make_schedule("linear", 2e-4, 1000, 30)
  tx = state_lib.make_optimizer(lora_jax.combine(trainable, frozen), schedule, weight_decay=0.0)
  state = jax.eval_shape(lambda t: state_lib.init_state(t, tx, 0), trainable)
  n = jax.device_count()
  rows = cfg.batch * n
  task = CausalLM(lora_jax.lora_apply(module.apply), None, None, rows, rows, seed=0)
  parallel = par.Parallel("mesh", step_lib.make_train_step(task.loss, tx), task.eval_step,
                          shard_frozen=job["shard_frozen"])  # fmt: skip
  # Parallel.put_state / put_frozen / put_batch's shardings, on shapes
  state, frozen, batch = parallel.placed_shapes(state, frozen, clm_batch(cfg, rows))
  t0 = time.perf_counter()
  # Parallel.train's jitted step (donated state, replicated outputs), traced in its mesh
  # context: what run_clm.py compiles
  with parallel.context():
    lowered = parallel.train_program().lower(state, frozen, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  peak += m.temp_size_in_bytes
  base_held, lora_params = held_bytes(frozen), sum(x.size for x in jax.tree.leaves(trainable))
  layer = layer_bytes(frozen, cfg.model.layers)
  return {
    **{k: job[k] for k in ("config", "base", "attention", "shard_frozen")},
    "model": job.get("model") or {},
    "devices": n,
    "rows_per_device": cfg.batch,
    "seq": cfg.seq,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "base_bytes_whole": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen)),
    "base_bytes_per_device": base_held,
    "state_bytes_per_device": held_bytes(state),
    "batch_bytes_per_device": held_bytes(batch),
    "layer_bytes": layer,
    "lora_params": lora_params,
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "peak_bytes": int(peak),
    "lower_s": round(t1 - t0, 1),
    "compile_s": round(t2 - t1, 1),
    "expected_bytes": expected(
      cfg, base_held, lora_params, layer, job["attention"], parallel.shard_frozen and n > 1
    ),
    "collectives": collectives(compiled.as_text()),
  }


def run_one(job: dict, variant: str, devices: int = DEVICES) -> dict:
  """:func:`plan` in a fresh process over ``devices`` forced host devices, with the variant's
  ``XLA_FLAGS``."""
  flags = f"--xla_force_host_platform_device_count={devices} {XLA_VARIANTS[variant]}".strip()
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "bench.fsdp_memory", "--one", json.dumps(job)]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  wall = round(time.perf_counter() - t0, 1)
  if proc.returncode != 0:
    return {**job, "xla": variant, "devices": devices, "error": proc.stderr[-800:]}
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "xla": variant, "wall_s": wall}


MODEL_PARTS = ("base", "lora", "activations", "logits", "gathered")


def markdown(rows: list[dict]) -> str:
  """The table of docs/benchmarks.md: GiB per device of XLA's plan beside the model."""
  head = ("| config | base | attention | XLA:CPU flags | devices | arguments | outputs | aliased "
          "| temporaries | peak (plan) | model: base + LoRA/Adam + activations + logits + "
          "gathered = total | compile s |")  # fmt: skip
  lines = [head, "|" + " --- |" * 12]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['config']} | {r['base']} | {r['attention']} | {r['xla']} | "
                   f"{r['devices']} | error |" + " |" * 6)  # fmt: skip
      continue
    e = r["expected_bytes"]
    model = " + ".join(gib(e[k]) for k in MODEL_PARTS)
    replicated = r["devices"] > 1 and not r["shard_frozen"]
    devices = f"{r['devices']}" + (" (base replicated)" if replicated else "")
    figures = [gib(r[k]) for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")]
    cells = [r["config"], r["base"], r["attention"], r["xla"], devices, *figures,
             f"**{gib(r['peak_bytes'])}**", f"{model} = {gib(e['total'])}",
             f"{r['compile_s']:.0f}"]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default=DEFAULT, help="comma list of LLM configurations")
  p.add_argument("--bases", default="bf16,nf4", help=f"comma list from {list(llm_memory.BASES)}")
  p.add_argument("--attention", default="xla_chunked,xla", help=f"{list(llm_memory.ATTENTION)}")
  p.add_argument("--xla_variants", default="default,no-licm", help=f"from {list(XLA_VARIANTS)}")
  p.add_argument("--devices", default=f"1,{DEVICES}", help="comma list of mesh sizes (forced host "
                 "devices); 1: the same step unsharded, for reference")  # fmt: skip
  p.add_argument("--shard_frozen", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--out", type=pathlib.Path, help="write the rows as JSON here")
  p.add_argument("--one", help=argparse.SUPPRESS)  # worker: one plan, printed as JSON
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(plan(json.loads(args.one))))
    return 0
  cfgs = [c for c in configs.resolve(args.configs) if c.is_llm]
  bases, attentions = args.bases.split(","), args.attention.split(",")
  variants = args.xla_variants.split(",")
  meshes = [int(n) for n in args.devices.split(",")]
  bad = [b for b in bases if b not in llm_memory.BASES]
  bad += [a for a in attentions if a not in llm_memory.ATTENTION]
  bad += [v for v in variants if v not in XLA_VARIANTS]
  if bad or not cfgs:
    p.error(f"unknown {bad or args.configs}; see --help")
  rows = []
  for cfg in cfgs:
    for base in bases:
      for attention in attentions:
        for variant in variants:
          for n in meshes:
            job = {"config": cfg.name, "base": base, "attention": attention,
                   "shard_frozen": args.shard_frozen}  # fmt: skip
            rows.append(run_one(job, variant, n))
            print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
  return llm_memory.report(rows, markdown, args.out)


if __name__ == "__main__":
  sys.exit(main())
