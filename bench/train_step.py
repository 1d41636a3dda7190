"""Times the LoRA training step (forward, backward, AdamW) of lora_jax, and of PyTorch + PEFT
beside it, for named configurations.

Each configuration runs in a fresh process per side (``bench/jax_step.py``,
``bench/peft_step.py``), so a CPU figure of peak memory (the process's resident set during the
timed steps) belongs to that configuration alone; on a GPU peak memory is the device's
(``memory_stats()["peak_bytes_in_use"]`` for JAX, ``torch.cuda.max_memory_allocated()`` for
PyTorch). Step time is the median of ``--steps`` steps after ``--warmup`` steps, each ending
with the device synchronised. With ``--peft`` the PEFT side runs right after each lora_jax
configuration, on the same device in the same command, and every lora_jax row gets its
lora_jax/PEFT ratios.

Usage (repository root):
  python bench/train_step.py --configs cpu --peft --out bench/results/cpu
  python bench/train_step.py --configs gpu --dtype bfloat16 --base_dtype bfloat16 \\
      --peft --peak_tflops 790 --out bench/results/h100
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``lora_jax`` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import configs  # noqa: E402
from bench import report  # noqa: E402
from bench import schedule  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16")
ATTENTION = ("auto", "xla", "xla_chunked", "cudnn", "pallas")  # pallas: decoders on a GPU
PEFT_IMPLS = ("eager", "compile")
HIDDEN_ACTS = ("gelu", "gelu_new", "relu")
PRNGS = ("threefry2x32", "rbg", "unsafe_rbg")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__,
    epilog="configurations (--configs):\n" + configs.help_text(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--configs", default="cpu", help="comma list of names and groups (see below)")
  p.add_argument(
    "--dtype", default="float32", choices=DTYPES, help="compute dtype (bfloat16: autocast on PEFT)"
  )
  p.add_argument(
    "--base_dtype",
    default="float32",
    choices=DTYPES,
    help="dtype of the frozen base weights; adapters, head and optimizer state stay float32",
  )
  p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  p.add_argument(
    "--hidden_act",
    default="gelu",
    choices=HIDDEN_ACTS,
    help="activation, both sides (RoBERTa: gelu, the exact erf form)",
  )
  p.add_argument("--hidden_dropout", type=float, default=0.1, help="hidden-state dropout")
  p.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on adapter inputs")
  p.add_argument(
    "--attn_dropout",
    type=float,
    default=0.0,
    help="PEFT side's attention-probability dropout (lora_jax's fused attention has none)",
  )
  p.add_argument("--remat", action="store_true", help="rematerialise each layer (both sides)")
  p.add_argument("--attention", default="auto", choices=ATTENTION, help="lora_jax attention")
  p.add_argument(
    "--no_donate", dest="donate", action="store_false", help="do not donate state to jit"
  )
  p.add_argument(
    "--prng",
    default="threefry2x32",
    choices=PRNGS,
    help="JAX PRNG implementation of the dropout keys (jax.random.key(..., impl=))",
  )
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS of the lora_jax worker")
  p.add_argument("--peft", action="store_true", help="also run PyTorch + PEFT on this device")
  p.add_argument(
    "--peft_impl",
    default="eager,compile",
    help=f"comma list of PEFT variants from {list(PEFT_IMPLS)} (with --peft)",
  )
  p.add_argument("--peak_tflops", type=float, default=None, help="device peak, for MFU")
  p.add_argument(
    "--schedule",
    default="lockstep",
    choices=schedule.SCHEDULES,
    help="lockstep: alternate the timed steps of the lora_jax and PEFT processes (robust to a "
    "busy shared CPU; JAX then allocates GPU memory on demand); sequential: one process at a "
    "time (GPU figures comparable with the shared PEFT anchors)",
  )
  p.add_argument(
    "--cpus",
    default="",
    help="comma list of CPU ids every worker is pinned to (e.g. 0: one core, one thread per "
    "side); default: no pinning",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--loss_chunk",
    type=int,
    default=256,
    help="LLM configurations: positions whose logits lora_jax forms at once (0: the full "
    "logits, then optax's cross-entropy)",
  )
  p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
  p.add_argument("--out", type=pathlib.Path, default=None, help="write results.jsonl, results.md")
  return p


def _check(args: argparse.Namespace) -> list[str]:
  impls = [s.strip() for s in args.peft_impl.split(",") if s.strip()]
  bad = [s for s in impls if s not in PEFT_IMPLS]
  if bad or not impls:
    raise SystemExit(f"--peft_impl {args.peft_impl!r}: unknown {bad}; valid: {list(PEFT_IMPLS)}")
  if args.steps < 1 or args.warmup < 0:
    raise SystemExit(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
  for name in ("hidden_dropout", "lora_dropout", "attn_dropout"):
    if not 0.0 <= getattr(args, name) < 1.0:
      raise SystemExit(f"--{name} {getattr(args, name)} must be in [0, 1)")
  return impls


def options(args: argparse.Namespace) -> dict:
  """The worker options every job of this run shares (``configs.ROW_OPTIONS`` + MFU peak)."""
  opts = {k: getattr(args, k) for k in configs.ROW_OPTIONS if hasattr(args, k)}
  opts.update(
    attention=None if args.attention == "auto" else args.attention,
    lockstep=args.schedule == "lockstep",
    cpus=_cpus(args.cpus),
    peak_tflops=args.peak_tflops,
  )
  return opts


def run(args: argparse.Namespace) -> list[dict]:
  """All requested configurations, lora_jax then PEFT for each; rows with ratios."""
  impls = _check(args)
  cfgs = configs.resolve(args.configs)
  base = options(args)
  rows = []
  for cfg in cfgs:
    jobs = [("bench.jax_step", {})]
    if args.peft:
      jobs += [("bench.peft_step", {"compile": impl == "compile"}) for impl in impls]
    jobs = [(module, {**base, **extra, "config": cfg.name}) for module, extra in jobs]
    for (module, opts), row in zip(jobs, schedule.run(jobs, args.steps, args.timeout), strict=True):
      side = "lora_jax" if module == "bench.jax_step" else "peft"
      row = {"side": side, "config": cfg.name, "impl": _impl(side, opts), **row}
      rows.append(row)
      print(_progress(row), file=sys.stderr, flush=True)
  return report.add_ratios(rows)


def _cpus(spec: str) -> list[int] | None:
  if not spec:
    return None
  try:
    cpus = [int(c) for c in spec.split(",")]
  except ValueError:
    raise SystemExit(f"--cpus {spec!r}: expected a comma list of CPU ids, e.g. 0 or 0,1") from None
  valid = sorted(os.sched_getaffinity(0))
  if not set(cpus) <= set(valid):
    raise SystemExit(f"--cpus {spec!r}: CPU ids {sorted(set(cpus) - set(valid))} not in {valid}")
  return cpus


def _impl(side: str, opts: dict) -> str:
  if side == "lora_jax":
    return "jit"
  return "torch.compile" if opts["compile"] else "eager"


def _progress(row: dict) -> str:
  what = f"{row['config']:<26} {row['side']:<8} {row['impl']:<13}"
  if "error" in row:
    return f"{what} {row['error']}"
  return f"{what} {row['step_ms']:9.1f} ms  {row['tokens_per_s']:10.0f} tok/s"


def header(argv: list[str]) -> dict:
  """The first JSON line of results.jsonl: what ran, where and when."""
  return {
    "command": "python bench/train_step.py " + shlex.join(argv),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "host": platform.node(),
    "cpu": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
  }


def _environment(rows: list[dict]) -> str:
  """Devices and library versions, as the workers reported them."""
  seen: dict[str, str] = {}
  for r in rows:
    if "device" in r:
      seen.setdefault(f"{r['side']} device", r["device"])
    for lib, version in r.get("versions", {}).items():
      seen.setdefault(lib, version)
  return ", ".join(f"{k}: {v}" for k, v in seen.items())


def write(out: pathlib.Path, head: dict, rows: list[dict]) -> None:
  """``results.jsonl`` (the header line, then one line per row) and ``results.md``."""
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "results.jsonl", "w") as f:
    for line in (head, *rows):
      f.write(json.dumps(line) + "\n")
  (out / "results.md").write_text(
    f"`{head['command']}`\n\n{head['date']}, {head['cpu_count']} CPUs; "
    f"{_environment(rows)}\n\n{report.markdown(rows)}\n"
  )


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  head = header(argv)
  try:
    rows = run(args)
  except ValueError as e:  # unknown configuration name
    parser().error(str(e))
  print(report.markdown(rows))
  if args.out is not None:
    write(args.out, head, rows)
  return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
