"""The SmolLM2 recipe: lora_jax's ``train/run_clm.py`` beside PyTorch + PEFT at equal padded shapes.

Real model and data: SmolLM2-135M-Instruct (``.ci/fetch_smollm2.sh``) and the ISO-date task of
``configs/smollm2_dates.yaml`` (LoRA r=8 alpha=16 on q_proj and v_proj). One initial adapter,
lora_jax's initialisation of that config written in PEFT's format, starts three runs:

* ``peft``: ``bench/peft_clm_recipe.py``, a PyTorch loop on run_clm.py's padded batches
  (``--no-packing``: batches of ``PADDED_ROWS`` conversations, each padded to its length bucket);
* ``lora_jax padded``: ``run_clm.py --no-packing`` on the same batches, same steps;
* ``lora_jax packed``: ``run_clm.py`` as configured (packed rows of 256 tokens, about as many
  conversations per step), with the held-out exact match before the first step and after.

The two padded runs run at once in lockstep (``bench/clm_lockstep.py`` and ``peft_clm_recipe.py
--lockstep``): each sets up and takes its first step alone, then their steps alternate, so the
load of a shared machine falls on both sides alike (timed one run after the other, the ratio
swung by 12% between runs on this 2-core machine). The packed run follows; ``--rounds`` repeats
the whole. Both sides time each step the same way: the whole loop iteration, from taking the
batch to the updated weights. Reported per run: the median seconds per optimizer step, for the
padded runs also the steady-state seconds per step (:func:`steady_s_per_step`: a side's first
step of a batch shape is its warm-up, and lora_jax's compiles), seconds per step over the whole
loop (compilation included), the median examples per second, the final eval loss. Then the
ratio lora_jax padded / PEFT of the steady-state s/step (and of the fastest steps), and
whether transformers + PEFT, loading the packed run's exported adapter, answers the test
prompts greedily exactly as lora_jax did.

Usage (repository root):
  python bench/clm_recipe.py --out bench/results/clm_recipe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: make `train` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import measure  # noqa: E402
from bench import schedule  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "smollm2_dates.yaml")
PADDED_ROWS = 4  # conversations per padded batch; a packed step of 2 x 256 holds about 5
NO_SAMPLES = ["--generation_prompts_file", "", "--no-eval_on_start"]


def write_initial_adapter(config: str, folder: pathlib.Path) -> None:
  """lora_jax's initial adapter for ``config`` (``run_clm.py``'s own ``load_model``), as PEFT."""
  import lora_jax
  from train.tasks.clm import args as clm_args
  from train.tasks.clm import pipeline as clm_train

  args = clm_args.parse_args(["--config", config])
  _, params, hf_config = clm_train.load_model(args)
  lora_jax.export_peft(
    folder,
    params,
    base_model_name_or_path=args.model_name_or_path,
    config=hf_config,
    task_type="CAUSAL_LM",
  )


def lora_jax_run(config: str, adapter: str, out: str, extra: list[str]) -> dict:
  """``train/run_clm.py --config CONFIG`` from ``adapter``; figures from its outputs."""
  script = str(REPO / "train" / "run_clm.py")
  _, wall = _run([sys.executable, script, *_run_clm_flags(config, adapter, out, extra)])
  return {**lora_jax_figures(out), "wall_s": round(wall, 1)}


def _run_clm_flags(config: str, adapter: str, out: str, extra: list[str]) -> list[str]:
  return ["--config", config, "--adapter_name_or_path", adapter, "--output_dir", out,
          "--no-progress", *extra]  # fmt: skip


def lora_jax_figures(out: str) -> dict:
  """A finished ``run_clm.py`` run's figures, from the files in ``out``."""
  rows = [json.loads(x) for x in (pathlib.Path(out) / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "loss" in r]
  res = json.loads((pathlib.Path(out) / "eval_results.json").read_text())
  row = {
    "steps": res["train_steps"],
    "median_s_per_step": statistics.median(r["s_per_step"] for r in steps),
    "step_s": [r["s_per_step"] for r in steps],
    "s_per_step": res["train_runtime_s"] / res["train_steps"],
    "examples_per_s": statistics.median(r["examples_per_s"] for r in steps),
    "losses": [r["loss"] for r in steps],
    "eval_loss": res["eval_loss"],
  }
  start = next((r for r in rows if r["step"] == 0 and "eval_loss" in r), None)
  if start is not None:
    row["eval_loss_before"] = start["eval_loss"]
  if "samples_exact_match" in res:
    row["exact_match_before"] = start["samples_exact_match"] if start else None
    row["exact_match"] = res["samples_exact_match"]
  return row


def peft_run(config: str, adapter: str, extra: list[str]) -> dict:
  """``bench/peft_clm_recipe.py``: its JSON line."""
  script = REPO / "bench" / "peft_clm_recipe.py"
  stdout, wall = _run([sys.executable, str(script), "--adapter", adapter, "--",
                       "--config", config, *extra])  # fmt: skip
  (row,) = measure.parse_rows(stdout)
  row.pop("side")
  row["wall_s"] = round(wall, 1)
  return row


def lockstep_pair(config: str, adapter: str, out: str, extra: list[str], timeout: float = 3600):
  """``(lora_jax row, PEFT row)``: ``run_clm.py`` (``bench/clm_lockstep.py``) and PEFT's loop
  from ``adapter`` with the same ``extra`` flags, their optimizer steps alternating."""
  from train.tasks.clm import args as clm_args

  steps = clm_args.parse_args(["--config", config, *extra]).max_steps
  peft_script = str(REPO / "bench" / "peft_clm_recipe.py")
  commands = [
    [sys.executable, "-m", "bench.clm_lockstep", *_run_clm_flags(config, adapter, out, extra)],
    [sys.executable, peft_script, "--lockstep", "--adapter", adapter, "--", "--config", config,
     *extra],
  ]  # fmt: skip
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  deadline, workers = time.monotonic() + timeout, []
  t0 = time.perf_counter()
  for cmd in commands:  # one at a time up to the first step: set-ups and compilations alone
    workers.append(schedule.Worker(cmd, env))
    if workers[-1].expect(measure.READY_MARK, deadline) is None:
      break
  else:
    for k in range(1, steps):  # steps 2..steps, alternating, the first to go rotating
      for worker in workers[k % 2 :] + workers[: k % 2]:
        time.sleep(schedule.PAUSE_S)
        if not worker.send(measure.GO) or worker.expect(measure.STEP_MARK, deadline) is None:
          break
      else:
        continue
      break
  rows = [w.finish(deadline) for w in workers]
  wall = round(time.perf_counter() - t0, 1)
  for side, row in zip(("lora_jax", "PEFT"), rows, strict=False):
    if "error" in row or row.get("exit", 0) != 0:
      raise RuntimeError(f"the {side} side of the lockstep run failed: {row}")
  if len(rows) < 2:
    raise RuntimeError("the lockstep run stopped before the PEFT side started")
  rows[1].pop("side")
  return {**lora_jax_figures(out), "wall_s": wall}, {**rows[1], "wall_s": wall}


def _run(cmd: list[str]) -> tuple[str, float]:
  """``(stdout, wall seconds)`` of a command that must succeed (run in the repository root)."""
  t0 = time.perf_counter()
  env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    name = pathlib.Path(cmd[1]).name
    raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc.stdout, wall


def transformers_answers(model_path: str, adapter: str, prompts: list[str], max_new_tokens: int):
  """Greedy answers of transformers' model with the PEFT adapter loaded by
  ``PeftModel.from_pretrained``, to ``prompts`` asked as user turns (as ``run_clm.py`` asks)."""
  import peft
  import torch
  import transformers

  from train.data import clm as clm_data

  tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
  base = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
  model = peft.PeftModel.from_pretrained(base, adapter).eval()
  answers = []
  with torch.no_grad():
    for p in prompts:  # one by one: no padding to differ from lora_jax's left-padded batches
      ids = clm_data.render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
      out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
      )
      answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
  return answers


def check_export(config: str, out: str, prompts: int | None = None) -> dict:
  """The packed run's ``adapter/`` in transformers + PEFT: greedy answers equal to lora_jax's
  final samples (the first ``prompts`` of them; all by default)?"""
  from train.tasks.clm import args as clm_args

  args = clm_args.parse_args(["--config", config])
  rows = [json.loads(x) for x in (pathlib.Path(out) / "samples.jsonl").read_text().splitlines()]
  last = max(r["step"] for r in rows)
  ours = [r for r in rows if r["step"] == last][:prompts]
  theirs = transformers_answers(
    args.model_name_or_path,
    str(pathlib.Path(out) / "adapter"),
    [r["prompt"] for r in ours],
    args.generation_max_new_tokens,
  )
  differ = [
    {"prompt": r["prompt"], "lora_jax": r["generation"], "transformers": t}
    for r, t in zip(ours, theirs, strict=True)
    if r["generation"] != t
  ]
  return {"prompts": len(ours), "equal": len(ours) - len(differ), "differ": differ}


def compare(config: str = CONFIG, padded_steps: int | None = None, rounds: int = 1,
            check: bool = True, check_prompts: int | None = None, log=print) -> dict:  # fmt: skip
  """Alternating runs of the three sides; the summary the module doc describes. ``check``: the
  export check, on the first ``check_prompts`` test prompts (all by default)."""
  padded = ["--no-packing", "--per_device_train_batch_size", str(PADDED_ROWS), *NO_SAMPLES]
  if padded_steps is not None:
    padded += ["--max_steps", str(padded_steps)]
  runs, result = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    adapter = pathlib.Path(tmp) / "initial_adapter"
    write_initial_adapter(config, adapter)
    sides = ("lora_jax padded", "peft", "lora_jax packed")
    for r in range(rounds):
      ours, theirs = lockstep_pair(config, str(adapter), f"{tmp}/padded{r}", padded)
      packed = lora_jax_run(config, str(adapter), f"{tmp}/packed{r}", [])
      if check and r == 0:
        result["export_check"] = check_export(config, f"{tmp}/packed{r}", check_prompts)
      for side, row in zip(sides, (ours, theirs, packed), strict=True):
        row = {"side": side, "round": r, **row}
        log(json.dumps({k: v for k, v in row.items() if k != "losses"}))
        runs.append(row)

  shapes = next(x["step_shapes"] for x in runs if x["side"] == "peft")
  for x in runs:
    if x["side"] != "lora_jax packed":
      x["steady_s_per_step"] = steady_s_per_step(x["step_s"], shapes)
      x["fastest_s_per_step"] = steady_s_per_step(x["step_s"], shapes, min)

  def mean(side, key):
    return statistics.mean(x[key] for x in runs if x["side"] == side)

  result.update(
    runs=runs,
    median_s_per_step={s: mean(s, "median_s_per_step") for s in sides},
    examples_per_s={s: mean(s, "examples_per_s") for s in sides},
    eval_loss={s: mean(s, "eval_loss") for s in sides},
  )
  steady = {s: mean(s, "steady_s_per_step") for s in sides[:2]}
  result["steady_s_per_step"] = steady
  result["ratio"] = steady["lora_jax padded"] / steady["peft"]
  fastest = {s: mean(s, "fastest_s_per_step") for s in sides[:2]}
  result["fastest_s_per_step"] = fastest
  result["ratio_fastest"] = fastest["lora_jax padded"] / fastest["peft"]
  return result


def steady_s_per_step(step_s: list[float], shapes: list, stat=statistics.median) -> float:
  """Seconds per step of the steady state: the steps whose batch shape an earlier step had,
  each counted at the median (``stat``) of its shape's steady steps. With ``stat=min``, the
  fastest: the steps least disturbed by other jobs on a shared machine (bench/NOTES.md entry 2).

  Each side's first step of a shape is its warm-up (XLA compiles a program for the shape;
  PyTorch sizes its allocator). Medians per shape make the figure robust to a disturbed step,
  and unlike one median over every step it cannot jump between the shapes' times.

  Example:
    >>> shapes = [[4, 96], [4, 96], [4, 128], [4, 128], [4, 96], [4, 96]]
    >>> round(steady_s_per_step([9.0, 2.0, 8.0, 3.0, 2.5, 2.2], shapes), 6)  # (3x2.2 + 3.0) / 4
    2.4
  """
  if len(step_s) != len(shapes):
    raise ValueError(f"{len(step_s)} step times for {len(shapes)} batch shapes")
  by_shape: dict[tuple, list[float]] = {}
  for t, shape in zip(step_s, shapes, strict=True):
    by_shape.setdefault(tuple(shape), []).append(t)
  steady = [(len(ts) - 1, stat(ts[1:])) for ts in by_shape.values() if len(ts) > 1]
  if not steady:
    raise ValueError(f"no batch shape repeats in {len(shapes)} steps: no steady-state step")
  return sum(n * m for n, m in steady) / sum(n for n, _ in steady)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=CONFIG)
  p.add_argument("--padded_steps", type=int, help="steps of the padded runs (default: config's)")
  p.add_argument("--rounds", type=int, default=1)
  p.add_argument("--out", help="write the JSON result here")
  args = p.parse_args(argv)
  if not (REPO / ".cache" / "SmolLM2-135M-Instruct").is_dir():
    p.error("SmolLM2-135M-Instruct is missing: bash .ci/fetch_smollm2.sh")
  result = compare(args.config, args.padded_steps, args.rounds)
  med, ex = result["median_s_per_step"], result["examples_per_s"]
  steady = result["steady_s_per_step"]
  print(
    f"steady-state s/step: lora_jax padded {steady['lora_jax padded']:.3f}, PEFT "
    f"{steady['peft']:.3f} (ratio {result['ratio']:.3f}; fastest steps' ratio "
    f"{result['ratio_fastest']:.3f}); median s/step of every step: "
    f"lora_jax padded {med['lora_jax padded']:.3f}, PEFT {med['peft']:.3f}, "
    f"lora_jax packed {med['lora_jax packed']:.3f}; examples/s "
    + ", ".join(f"{k} {v:.2f}" for k, v in ex.items())
  )
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
