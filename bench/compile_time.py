"""Compilation time of a LoRA training step against model depth, scanned and unscanned layers.

A scanned decoder (``scan_layers=True``, ``nn.scan``) traces and compiles one layer whatever
the depth; an unscanned one unrolls every layer into the program. This script builds the
step (gradients of the next-token loss with respect to all-linear LoRA adapters, remat on)
for decoders of the same width and 4 or 32 layers, from shapes only (``jax.eval_shape``:
nothing is allocated), and times ``jit(...).lower(...)`` plus ``.compile()`` in a fresh process
per configuration, alternating the order of the rounds.

Usage (repository root):
  python bench/compile_time.py --rounds 3 --out bench/results/compile_time.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``lora_jax`` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# SmolLM2-135M's width (hidden 576, 9 / 3 heads, intermediate 1536, vocab 49152).
WIDTH = dict(
  vocab_size=49152,
  hidden_size=576,
  intermediate_size=1536,
  num_attention_heads=9,
  num_key_value_heads=3,
  tie_word_embeddings=True,
)


def compile_seconds(layers: int, scan: bool, batch: int, seq: int) -> dict:
  """Seconds to trace + lower and to compile the step, for one configuration (this process)."""
  import jax
  import jax.numpy as jnp
  import transformers

  import lora_jax
  from lora_jax.models import auto_model

  cfg = transformers.LlamaConfig(num_hidden_layers=layers, **WIDTH)
  module = auto_model(cfg, scan_layers=scan, remat=True)
  ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 1), jnp.int32))
  adapted = lora_jax.lora_init(
    shapes, lora_jax.LoraRule("all-linear", rank=8), rng=jax.random.key(0), layouts=layouts
  )
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  apply = lora_jax.lora_apply(module.apply)

  def loss(t, f, ids):
    logits = apply(lora_jax.combine(t, f), ids)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

  start = time.perf_counter()
  lowered = jax.jit(jax.grad(loss)).lower(trainable, frozen, ids)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {
    "layers": layers,
    "scan": scan,
    "lower_s": lowered_at - start,
    "compile_s": done - lowered_at,
    "total_s": done - start,
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--rounds", type=int, default=3, help="fresh-process runs per configuration")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--no-unscanned", dest="unscanned", action="store_false",
                 help="time the scanned model only")  # fmt: skip
  p.add_argument("--out", type=pathlib.Path, help="write the rows and medians as JSON here")
  p.add_argument("--worker", nargs=2, metavar=("LAYERS", "SCAN"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    row = compile_seconds(int(args.worker[0]), args.worker[1] == "1", args.batch, args.seq)
    print(json.dumps(row))
    return 0

  configs = [(4, True), (32, True)] + ([(4, False), (32, False)] if args.unscanned else [])
  rows = []
  for r in range(args.rounds):
    for layers, scan in configs if r % 2 == 0 else configs[::-1]:
      cmd = [sys.executable, __file__, "--worker", str(layers), "1" if scan else "0"]
      cmd += ["--batch", str(args.batch), "--seq", str(args.seq)]
      out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
      print(json.dumps(rows[-1]), flush=True)
  medians = {
    f"{layers}-{'scan' if scan else 'loop'}": statistics.median(
      r["total_s"] for r in rows if (r["layers"], r["scan"]) == (layers, scan)
    )
    for layers, scan in configs
  }
  ratio = medians["32-scan"] / medians["4-scan"]
  print(f"median seconds (trace + lower + compile): {medians}")
  print(f"32 layers / 4 layers, scanned: {ratio:.2f}")
  if args.unscanned:
    print(f"32 layers / 4 layers, unscanned: {medians['32-loop'] / medians['4-loop']:.2f}")
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"batch": args.batch, "seq": args.seq, "rows": rows, "medians": medians}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
