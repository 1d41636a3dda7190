"""Adapter banks: what a mixed-adapter batch costs beside one adapter's batch of the same size.

    python -m bench.bank                                   # SmolLM2-135M from .cache (CPU here)
    python -m bench.bank --model tiny --reps 2             # a small random Llama (smoke)
    python -m bench.bank --batch 32 --seq 256 --new_tokens 64 --reps 10   # on a GPU

Three variants of the same rows, timed alternately in one process (so they share the same
minutes of a noisy machine), for one training step (``value_and_grad`` + AdamW update) and for
greedy generation:

* ``mixed``: one batch of ``--batch`` rows over a bank of ``--adapters`` adapters, row ``i``
  through adapter ``i % adapters``;
* ``single``: the same batch through one adapter alone (the plain LoRA path);
* ``separate``: the rows of each adapter as their own single-adapter batch, one after another.

It also times the low-rank kernel alone on one linear layer: the gather of each row's ``A`` and
``B`` that banks use, against a one-hot einsum over every adapter. Writes one JSON file with
medians in seconds and the ratios ``mixed / single`` (the issue's bound: at most 1.3) and
``separate / mixed``; tokens/s per variant.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax.models import from_config
from lora_jax.models import from_pretrained
from lora_jax.models import generate

SMOLLM2 = pathlib.Path(".cache/SmolLM2-135M-Instruct")


def _model(name: str):
  if name == "tiny":
    import transformers

    cfg = transformers.LlamaConfig(
      vocab_size=256,
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
    )
    return from_config(cfg, "causal-lm", rng=0)
  if not SMOLLM2.exists():
    sys.exit(f"bench.bank: {SMOLLM2} is missing: run bash .ci/fetch_smollm2.sh first")
  return from_pretrained(SMOLLM2)


def _adapters(module, base, n: int, rank: int):
  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 2), jnp.int32))
  out = {}
  for i in range(n):
    t = lora_jax.lora_init(
      base,
      lora_jax.LoraRule("all-linear", rank=rank, alpha=2 * rank),
      rng=jax.random.key(i),
      layouts=layouts,
    )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(t)
    rng = np.random.RandomState(i)
    t = jax.tree_util.tree_unflatten(
      treedef,
      [
        (0.01 * rng.randn(*x.shape)).astype(np.float32)
        if jax.tree_util.keystr(kp).endswith("['lora_b']")
        else x
        for kp, x in leaves
      ],
    )
    out[f"a{i}"] = t
  return out


def _step_fn(module, params):
  tx = lora_jax.lora_optimizer(optax.adamw(1e-4), params)
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params))
  apply = lora_jax.lora_apply(module.apply)

  @jax.jit
  def step(trainable, frozen, state, ids, ids_adapter):  # frozen as an argument, not a constant
    def loss(trainable):
      kw = {} if ids_adapter is None else {"adapter_ids": ids_adapter}
      logits = apply(lora_jax.combine(trainable, frozen), ids, jnp.ones_like(ids), **kw)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    value, grads = jax.value_and_grad(loss)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, value

  return functools.partial(step, frozen=frozen), trainable, tx.init(trainable)


def _timed(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def _kernel(batch: int, seq: int, dim: int, rank: int, n: int, reps: int) -> dict:
  """One layer's low-rank term on ``[batch, seq, dim]`` rows, one adapter per sequence, forward
  + gradient: the gather of each sequence's ``A``, ``B`` (what banks use) against a one-hot
  einsum over every adapter."""
  x = jax.random.normal(jax.random.key(0), (batch, seq, dim))
  a = jax.random.normal(jax.random.key(1), (n, dim, rank))
  b = jax.random.normal(jax.random.key(2), (n, rank, dim))
  ids = jnp.arange(batch) % n

  def gather(a, b, x):
    t = jnp.einsum("bti,bir->btr", x, a[ids])
    return jnp.einsum("btr,bro->bto", t, b[ids])

  def one_hot(a, b, x):
    hot = jax.nn.one_hot(ids, n, dtype=x.dtype)
    t = jnp.einsum("bti,nir->btnr", x, a) * hot[:, None, :, None]
    return jnp.einsum("btnr,nro->bto", t, b)

  fns = {
    name: jax.jit(jax.grad(lambda a, b, x, f=f: jnp.sum(f(a, b, x) ** 2), argnums=(0, 1, 2)))
    for name, f in (("gather", gather), ("one_hot", one_hot))
  }
  for f in fns.values():
    jax.block_until_ready(f(a, b, x))
  times = {k: [] for k in fns}
  for _ in range(max(reps, 5)):
    for k, f in fns.items():
      times[k].append(_timed(lambda f=f: f(a, b, x)))
  out = {f"kernel_{k}_s": statistics.median(v) for k, v in times.items()}
  out["kernel_one_hot_over_gather"] = out["kernel_one_hot_s"] / out["kernel_gather_s"]
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
  p.add_argument("--adapters", type=int, default=8)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=8)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default="bench/results/bank.json")
  args = p.parse_args(argv)
  if args.batch % args.adapters:
    p.error(f"--batch {args.batch} must be a multiple of --adapters {args.adapters}")

  module, base = _model(args.model)
  adapters = _adapters(module, base, args.adapters, args.rank)
  bank = lora_jax.adapter_bank(adapters)
  names = list(adapters)
  rng = np.random.RandomState(0)
  vocab = module.config.vocab_size
  ids = jnp.asarray(rng.randint(1, vocab, (args.batch, args.seq)), jnp.int32)
  rows = jnp.arange(args.batch, dtype=jnp.int32) % args.adapters
  per = [np.flatnonzero(np.asarray(rows) == i) for i in range(args.adapters)]

  bank_step, bank_tr, bank_st = _step_fn(module, bank)
  one_step, one_tr, one_st = _step_fn(module, adapters[names[0]])
  steps = {
    "mixed": lambda: bank_step(bank_tr, state=bank_st, ids=ids, ids_adapter=rows)[2],
    "single": lambda: one_step(one_tr, state=one_st, ids=ids, ids_adapter=None)[2],
    "separate": lambda: [
      one_step(one_tr, state=one_st, ids=ids[r], ids_adapter=None)[2] for r in per
    ],
  }
  prompts = [list(map(int, rng.randint(1, vocab, 6))) for _ in range(args.batch)]
  gens = {
    "mixed": lambda: generate(
      module, bank, prompts, max_new_tokens=args.new_tokens, adapter_ids=list(map(int, rows))
    ),
    "single": lambda: generate(module, adapters[names[0]], prompts, max_new_tokens=args.new_tokens),
    "separate": lambda: [
      generate(module, adapters[names[i]], [prompts[j] for j in r], max_new_tokens=args.new_tokens)
      for i, r in enumerate(per)
    ],
  }
  result = {
    "device": jax.devices()[0].device_kind,
    "platform": jax.default_backend(),
    **{k: v for k, v in vars(args).items() if k != "out"},
  }
  for kind, fns in (("train_step", steps), ("generate", gens)):
    for f in fns.values():  # compile
      jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(args.reps):  # alternate the variants: they share the same minutes
      for k, f in fns.items():
        times[k].append(_timed(f))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batch * (args.seq if kind == "train_step" else args.new_tokens)
    for k, v in med.items():
      result[f"{kind}_{k}_s"] = v
      result[f"{kind}_{k}_tokens_per_s"] = tokens / v
    result[f"{kind}_mixed_over_single"] = med["mixed"] / med["single"]
    result[f"{kind}_separate_over_mixed"] = med["separate"] / med["mixed"]
  hidden = module.config.hidden_size
  result.update(_kernel(args.batch, args.seq, hidden, args.rank, args.adapters, args.reps))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  for k, v in result.items():
    print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
  return result


if __name__ == "__main__":
  main()
