"""The GLUE acceptance recipe, lora_jax's ``train/run_glue.py`` beside PEFT's reference script.

Real model and data: all-MiniLM-L6-v2 (``.ci/fetch_minilm.sh``), GLUE SST-2 from ``../shared``,
8,000 training rows, one epoch of batch 32 at length <= 64, LoRA r=8 alpha=16 dropout 0.1 on
query/value (``RECIPE``). The two runs alternate (``--rounds`` pairs, lora_jax first in odd
rounds, PEFT first in even ones), so the machine's load drifts over both alike. Per run it
reports seconds per optimizer step over the whole training loop (compilation included, as
PEFT's eager loop has none to exclude) and the dev accuracy; then the lora_jax / PEFT ratio of
the mean s/step.

The runs do not use the same 8,000 rows: ``run_glue.py`` keeps the first N training rows, as
Hugging Face's ``run_glue.py --max_train_samples`` does, and shuffles them every epoch; PEFT's
script shuffles all rows with Python's ``random.seed(0)`` and keeps the first N. Both sets have
the same length distribution (mean 13.3 tokens, mean longest row of a batch of 32: 40).

Usage (repository root):
  python bench/glue_recipe.py --rounds 1 --out bench/results/glue_recipe.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
RECIPE = (
  "--task_name sst2 --max_train_samples 8000 --num_train_epochs 1 "
  "--per_device_train_batch_size 32 --max_seq_length 64 --learning_rate 5e-4 --weight_decay 0.01 "
  "--warmup_ratio 0.06 --lora_r 8 --lora_alpha 16 --lora_dropout 0.1 "
  "--lora_target_modules query value --seed 0"
).split()


def lora_jax_run(model: str, data: str, out: str, extra: list[str]) -> dict:
  """``train/run_glue.py`` with the recipe; its ``eval_results.json`` figures."""
  cmd = [
    sys.executable,
    str(REPO / "train" / "run_glue.py"),
    "--model_name_or_path",
    model,
    "--train_file",
    f"{data}/train.tsv",
    "--validation_file",
    f"{data}/validation.tsv",
    *RECIPE,
    "--save_steps",
    "0",
    "--output_dir",
    out,
    "--no-progress",
    *extra,
  ]
  _, wall = _run(cmd)
  res = json.loads((pathlib.Path(out) / "eval_results.json").read_text())
  return {
    "side": "lora_jax",
    "steps": res["train_steps"],
    "s_per_step": res["train_runtime_s"] / res["train_steps"],
    "train_s": res["train_runtime_s"],
    "dev_acc": res["eval_accuracy"],
    "wall_s": round(wall, 1),
  }


def peft_run(model: str, data: str) -> dict:
  """``../shared/bench/peft_sst2_minilm.py MODEL DATA 8000 1``: its last JSON line."""
  script = SHARED / "bench" / "peft_sst2_minilm.py"
  stdout, wall = _run([sys.executable, str(script), model, data, "8000", "1"])
  last = json.loads(stdout.strip().splitlines()[-1])
  return {
    "side": "peft",
    "steps": last["steps"],
    "s_per_step": last["train_s"] / last["steps"],
    "train_s": last["train_s"],
    "dev_acc": last["dev_acc"],
    "wall_s": round(wall, 1),
  }


def _run(cmd: list[str]) -> tuple[str, float]:
  """``(stdout, wall seconds)`` of a command that must succeed."""
  t0 = time.perf_counter()
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    name = pathlib.Path(cmd[1]).name
    raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc.stdout, wall


def compare(model: str, data: str, rounds: int, extra: list[str], log=print) -> dict:
  """Alternating runs; ``{"runs": [...], "ratio": mean lora_jax s/step / mean PEFT s/step}``."""
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      order = ("lora_jax", "peft") if r % 2 == 0 else ("peft", "lora_jax")
      for side in order:
        if side == "peft":
          row = peft_run(model, data)
        else:
          row = lora_jax_run(model, data, f"{tmp}/run{r}", extra)
        row["round"] = r
        log(json.dumps(row))
        runs.append(row)
  mean = {
    side: sum(x["s_per_step"] for x in runs if x["side"] == side) / rounds
    for side in ("lora_jax", "peft")
  }
  return {"runs": runs, "s_per_step": mean, "ratio": mean["lora_jax"] / mean["peft"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default=str(REPO / ".cache" / "all-MiniLM-L6-v2"))
  p.add_argument("--data", default=str(SHARED / "data" / "glue" / "sst2"))
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--out", help="write the JSON result here")
  p.add_argument("extra", nargs="*", help="more run_glue.py flags (after --)")
  args = p.parse_args(argv)
  for path in (args.model, args.data):
    if not pathlib.Path(path).exists():
      p.error(f"{path!r} does not exist (model: bash .ci/fetch_minilm.sh; data: ../shared)")
  result = compare(args.model, args.data, args.rounds, args.extra)
  print(
    f"s/step lora_jax {result['s_per_step']['lora_jax']:.3f}, PEFT "
    f"{result['s_per_step']['peft']:.3f}: ratio {result['ratio']:.3f}"
  )
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
