"""A/B experiments: variants of one configuration, timed in lockstep, as ratios to the first.

Each variant is a JSON object of option overrides (the keys of ``bench.configs.ROW_OPTIONS``,
plus ``"side": "peft"`` and ``"compile": true`` for the PyTorch side). Every variant runs in its
own process; their timed steps alternate (``bench.schedule``), so a busy shared CPU slows them
alike and the ratios hold even when absolute times drift. This is how ``bench/NOTES.md``
measured each prediction.

Usage (repository root):
  python -m bench.ab --config mini-128x16 --variant '{}' --variant '{"prng": "rbg"}'
  python -m bench.ab --config mini-128x16 --variant '{}' --variant '{"side": "peft"}'
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from bench import configs
from bench import schedule

DEFAULTS = {
  "dtype": "float32",
  "base_dtype": "float32",
  "steps": 10,
  "warmup": 2,
  "hidden_act": "gelu",
  "hidden_dropout": 0.1,
  "lora_dropout": 0.0,
  "attn_dropout": 0.0,
  "remat": False,
  "attention": None,
  "donate": True,
  "xla_flags": "",
  "prng": "threefry2x32",
  "lockstep": True,
  "seed": 0,
  "peak_tflops": None,
  "compile": False,
  "loss_chunk": 256,
}
EXTRA_KEYS = ("side", "compile", "peak_tflops")


def job(config: str, variant: dict, steps: int, warmup: int) -> tuple[str, dict]:
  """``(worker module, options)`` for one variant; unknown keys are an error naming the valid."""
  valid = set(configs.ROW_OPTIONS) | set(EXTRA_KEYS)
  bad = sorted(set(variant) - valid)
  if bad:
    raise ValueError(f"unknown variant keys {bad} in {variant}; valid: {sorted(valid)}")
  side = variant.get("side", "lora_jax")
  if side not in ("lora_jax", "peft"):
    raise ValueError(f"variant side {side!r} is not one of ['lora_jax', 'peft']")
  opts = {**DEFAULTS, "steps": steps, "warmup": warmup, **variant, "config": config}
  opts.pop("side", None)
  return ("bench.jax_step" if side == "lora_jax" else "bench.peft_step"), opts


def table(variants: list[dict], rows: list[dict]) -> str:
  """Markdown: per variant, median / min step, ratios to the first variant, memory."""
  ref = rows[0]
  lines = [
    "| variant | step ms | min ms | time vs first (median) | time vs first (min) "
    "| XLA step GiB | step peak RSS GiB |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for v, r in zip(variants, rows, strict=True):
    if "error" in r or "error" in ref:
      lines.append(f"| `{json.dumps(v)}` | error: {r.get('error', ref.get('error'))} |")
      continue
    med = r["step_ms"] / ref["step_ms"]
    low = r["step_ms_min"] / ref["step_ms_min"]
    lines.append(
      f"| `{json.dumps(v)}` | {r['step_ms']:.1f} | {r['step_ms_min']:.1f} | {med:.3f} | "
      f"{low:.3f} | {r.get('xla_step_gib') or '-'} | {r['rss_step_peak_gib']} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", required=True, help=f"one of {', '.join(configs.CONFIGS)}")
  p.add_argument("--variant", action="append", required=True, help="JSON option overrides")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--timeout", type=float, default=1800)
  args = p.parse_args(argv)
  if args.config not in configs.CONFIGS:
    p.error(f"unknown --config {args.config!r}; choose from {', '.join(configs.CONFIGS)}")
  variants = [json.loads(v) for v in args.variant]
  try:
    jobs = [job(args.config, v, args.steps, args.warmup) for v in variants]
  except ValueError as e:
    p.error(str(e))
  rows = schedule.run(jobs, args.steps, args.timeout)
  print(f"`python -m bench.ab {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
  print(table(variants, rows))
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
