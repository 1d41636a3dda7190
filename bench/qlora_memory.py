"""QLoRA memory of Llama-2-7B, measured without allocating anything.

Two figures, from shapes only (``jax.eval_shape`` and ``jax.ShapeDtypeStruct`` arguments):

* the frozen base: bytes of the parameters in bf16, and with every linear kernel but the
  ``lm_head`` in NF4 with double quantization (``lora_jax.quantize(..., "all-linear")``;
  embeddings, norms and the head stay bf16), and their ratio;
* a QLoRA training step (next-token loss through ``lora_apply``, LoRA r=16 on all linear
  layers in float32, ``lora_optimizer(optax.adamw)``, scanned layers, remat, bf16 compute),
  lowered and compiled for the CPU: XLA's buffer plan from ``memory_analysis()`` (arguments +
  outputs - donated aliases + temporaries: what the step needs at its peak).

Usage (repository root; about a minute on two cores):
  python bench/qlora_memory.py --out bench/results/qlora_memory.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``lora_jax`` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

import lora_jax
from lora_jax.models import auto_model

GIB = 1024**3
# meta-llama/Llama-2-7b-hf
LLAMA_2_7B = dict(
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=32,
)


def tree_bytes(tree) -> int:
  """Bytes of a tree of arrays or shapes; a quantized kernel counts what it stores."""
  total = 0
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, lora_jax.QuantizedArray)):
    if isinstance(leaf, lora_jax.QuantizedArray):
      total += leaf.nbytes
    else:
      total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
  return total


def qlora_memory(
  config: dict = LLAMA_2_7B,
  *,
  seq: int = 1024,
  batch: int = 1,
  rank: int = 16,
  compile_step: bool = True,
) -> dict:
  """Base bytes (bf16 and NF4) and, with ``compile_step``, the compiled step's buffer plan."""
  cfg = transformers.LlamaConfig(**config)
  module = auto_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True,
                      scan_layers=True)  # fmt: skip
  ids1 = jnp.ones((1, 1), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids1)
  layouts = lora_jax.kernel_layouts(module, ids1)
  quantized = lora_jax.quantize(shapes, "all-linear", kind="nf4", double_quant=True,
                                layouts=layouts)  # fmt: skip
  bf16_bytes, nf4_bytes = tree_bytes(shapes), tree_bytes(quantized)
  row = {
    "config": config,
    "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))),
    "base_bf16_bytes": bf16_bytes,
    "base_nf4_dq_bytes": nf4_bytes,
    "base_ratio": nf4_bytes / bf16_bytes,
  }
  if not compile_step:
    return row

  start = time.perf_counter()
  plan = step_plan(module, quantized, layouts, seq=seq, batch=batch, rank=rank)
  row.update(seq=seq, batch=batch, rank=rank, **plan, compile_s=time.perf_counter() - start)
  row["backend"] = jax.default_backend()
  return row


def step_plan(module, base, layouts, *, seq: int, batch: int, rank: int) -> dict:
  """XLA's buffer plan of the compiled LoRA step on ``base`` (shapes; quantized or not)."""
  rule = lora_jax.LoraRule("all-linear", rank=rank, alpha=2 * rank)
  adapted = lora_jax.lora_init(base, rule, rng=jax.random.key(0), layouts=layouts)
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  tx = lora_jax.lora_optimizer(optax.adamw(1e-4), adapted)
  apply = lora_jax.lora_apply(module.apply)

  def loss_fn(t, f, ids):
    logits = apply(lora_jax.combine(t, f), ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  def step(t, opt_state, f, ids):
    loss, grads = jax.value_and_grad(loss_fn)(t, f, ids)
    updates, opt_state = tx.update(grads, opt_state, t)
    return optax.apply_updates(t, updates), opt_state, loss

  opt_state = jax.eval_shape(tx.init, trainable)
  ids = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(trainable, opt_state, frozen, ids).compile()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  peak += m.temp_size_in_bytes
  return dict(
    trainable_params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(trainable))),
    frozen_bytes=tree_bytes(frozen),
    adapter_and_adam_bytes=tree_bytes(trainable) + tree_bytes(opt_state),
    step_argument_bytes=int(m.argument_size_in_bytes),
    step_output_bytes=int(m.output_size_in_bytes),
    step_alias_bytes=int(m.alias_size_in_bytes),
    step_temp_bytes=int(m.temp_size_in_bytes),
    step_peak_bytes=int(peak),
    step_peak_gib=peak / GIB,
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--out", type=pathlib.Path, help="write the result as JSON here")
  args = p.parse_args(argv)
  row = qlora_memory(seq=args.seq, batch=args.batch, rank=args.rank)
  base = f"{row['base_bf16_bytes'] / GIB:.2f} GiB bf16, {row['base_nf4_dq_bytes'] / GIB:.2f} GiB"
  print(f"base: {base} NF4 + double quant ({row['base_ratio']:.3f}x)")
  print(
    f"QLoRA step (seq {args.seq}, batch {args.batch}, r={args.rank}): "
    f"{row['step_peak_gib']:.2f} GiB planned by XLA:{row['backend']}"
  )
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
