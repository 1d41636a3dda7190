"""The device check: what runs the day a GPU or TPU is lent, in one command and one JSON file.

On a machine with a GPU (or a TPU), with no network, this runs each stage below as a
subprocess under its own time limit, and writes ``OUT/device_check.json``: the device and the
library versions, then per stage its command, status (``passed``, ``failed``, ``timeout``,
``skipped`` with the reason), seconds and figures, then a ``summary`` of the figures. The file
is rewritten after every stage (a stage in flight reads ``running``), so a run cut short still
leaves what it measured. Each stage's stdout and stderr are in ``OUT/logs/``.

Usage (repository root):
  bash bench/device_check.sh OUT                                # everything; see its header
  python bench/device_check.py --out OUT --stages llama         # one part again
  python bench/device_check.py --out OUT --dry_run --platform gpu   # the plan; runs nothing
  python bench/device_check.py --out OUT --smoke                # the same plumbing on CPU, tiny

Stages, in this order (``--stages`` picks groups; a stage is skipped, with the reason, once
``--budget`` seconds are spent, or when this python lacks a module it imports, e.g. pytest or
datasets; ``ok`` in the JSON is true when every stage passed or does not apply to the platform):

* ``probe``: ``jax.devices()[0].device_kind``, the platform, torch's ``get_device_name()``,
  versions (a subprocess: this process never holds the device).
* ``kernels``: ``pytest tests/test_pallas_attention.py`` (junit XML in ``OUT/kernels.xml``),
  on a GPU ``-k "not tpu"`` (``--kernel_tests``; the TPU kernel's interpreted cases and the TPU
  lowering are CPU checks that CI runs). On a GPU its ``interpret=False`` cases run the Pallas
  kernel compiled by Triton, the ``interpret=True`` ones the same kernel interpreted; counts of
  both. On a TPU its TPU-kernel cases run the Mosaic kernel compiled (interpreted on any other
  backend), and the ``smollm2-pallas`` stage runs it in training.
* ``llama-lora_jax``, ``llama-peft-eager``, ``llama-peft-compile``: the step of
  ``llama-1.1b-1024x8-packed`` (TinyLlama's shapes, LoRA r=16 on all layer linears, bf16 base
  and compute) through ``bench/train_step.py``'s workers, one process per side as its
  ``--schedule sequential`` runs them: step ms, tokens/s, MFU against ``--peak_tflops``, the
  device's peak memory; then lora_jax's speed and memory over each PEFT side's. No PEFT stage on
  a TPU (torch has no TPU here).
* ``smollm2-<attention>``: the SmolLM2 recipe (``configs/smollm2_dates.yaml`` through
  ``train/run_clm.py``, 30 steps of 2 packed rows of 256 tokens, LoRA r=8 on q_proj,v_proj) with
  SmolLM2-135M's architecture and random weights (``--config_name``: the checkpoint needs the
  network) in bf16, once per ``--attn_implementation``: the median tokens/s of steps 2..30 (the
  first compiles; later compiles of new target-count buckets are outliers the median ignores),
  the final train loss and the eval loss. Tokenizer: ``.cache/SmolLM2-135M-Instruct`` when its
  ``tokenizer.json`` is there (carry it: 3.5 MB), else ``configs/clm_quickstart``'s word-level
  one (a conversation is then fewer tokens; the packed rows are 256 tokens either way). Default
  choices: GPU ``pallas,cudnn,xla``, TPU ``pallas,xla``: ``auto`` is cuDNN on a GPU in bf16 and
  XLA on a TPU, and ``xla_chunked`` is XLA's attention at 256 tokens (one 512-query chunk).

Time on one H100 (estimates, none measured yet: JAX compiles 10-40 s per program; the PEFT
anchors of docs/benchmarks.md: llama-1.1B 1024x8 212 ms per eager step, 123 ms compiled, about
a minute of torch.compile) against each stage's limit:

  ========================  ========  =====  ==============================================
  stage                     estimate  limit  where the time goes
  ========================  ========  =====  ==============================================
  probe                         10 s   60 s  imports, device start
  kernels                       50 s  150 s  imports; ~20 small programs (Triton, XLA)
  llama-lora_jax                60 s  180 s  1.1B random host weights 15 s, compile 30 s,
                                              12 steps x 0.15 s
  llama-peft-eager              40 s  120 s  model init 20 s, 12 steps x 0.21 s
  llama-peft-compile           100 s  210 s  init 20 s, torch.compile 60 s, 12 x 0.12 s
  smollm2-<attention> x 3   3 x 40 s  120 s  imports 10 s, 2-4 step compiles, 30 steps,
                                              eval, the 540 MB random base written
  total                        380 s  450 s  --budget (bench/device_check.sh's hard stop:
                                              475 s, within the 8 minutes)
  ========================  ========  =====  ==============================================

A JAX compilation cache (``--compile_cache``, under /tmp) and Inductor's own cache make a rerun
on the same machine faster; the compile seconds of a rerun are then not first-run figures.

``--smoke`` runs every stage on CPU with tiny sizes (``llama-tiny-64x4-packed``, a 2-layer
SmolLM2-shaped model for 2 steps, one pytest case, MFU against a nominal 1 TFLOP/s, the
torch.compile stage with ``TORCH_COMPILE_DISABLE=1``; about 75 s on 2 busy CPU cores):
tests/test_device_check.py checks the JSON it writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import configs  # noqa: E402
from bench import measure  # noqa: E402
from bench import report  # noqa: E402
from bench import train_step  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULT = "device_check.json"
GROUPS = ("kernels", "llama", "smollm2")
PLATFORMS = ("gpu", "tpu", "cpu")
STATUSES = ("passed", "failed", "timeout", "skipped", "running")  # "running": cut off during it
MIN_STAGE_S = 20  # a stage that would get less than this of the budget is skipped
ATTENTION = {"gpu": "pallas,cudnn,xla", "tpu": "pallas,xla", "cpu": "xla"}
KERNEL_TESTS = {"gpu": "not tpu", "tpu": "", "cpu": "padded_lengths"}  # pytest -k ("": all)
PEAK_TFLOPS = {"gpu": 790.0}  # H100 bf16 dense, as the PEFT anchors; TPU: give --peak_tflops
SMOKE_PEAK_TFLOPS = 1.0  # nominal: a smoke run's MFU only proves the plumbing
LLAMA = "llama-1.1b-1024x8-packed"
SMOKE_LLAMA = "llama-tiny-64x4-packed"
RECIPE = "configs/smollm2_dates.yaml"
REAL_TOKENIZER = REPO / ".cache" / "SmolLM2-135M-Instruct"
WORD_TOKENIZER = REPO / "configs" / "clm_quickstart"
# SmolLM2-135M's transformers config (its config.json less the checkpoint's bookkeeping)
SMOLLM2_135M = {
  "architectures": ["LlamaForCausalLM"],
  "model_type": "llama",
  "vocab_size": 49152,
  "hidden_size": 576,
  "intermediate_size": 1536,
  "num_hidden_layers": 30,
  "num_attention_heads": 9,
  "num_key_value_heads": 3,
  "head_dim": 64,
  "hidden_act": "silu",
  "max_position_embeddings": 8192,
  "rms_norm_eps": 1e-5,
  "rope_theta": 100000.0,
  "tie_word_embeddings": True,
  "attention_bias": False,
  "mlp_bias": False,
  "initializer_range": 0.02,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "pad_token_id": 2,
}
SMOKE_SMOLLM2 = {
  **SMOLLM2_135M,
  "hidden_size": 64,
  "intermediate_size": 128,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 16,
}
# Seconds each stage may take: (accelerator, smoke)
LIMITS = {
  "probe": (60, 60),
  "kernels": (150, 60),
  "llama-lora_jax": (180, 60),
  "llama-peft-eager": (120, 60),
  "llama-peft-compile": (210, 60),
  "smollm2": (120, 90),
}
OFFLINE = {
  "HF_HUB_OFFLINE": "1",
  "HF_DATASETS_OFFLINE": "1",
  "TRANSFORMERS_OFFLINE": "1",
  "TOKENIZERS_PARALLELISM": "false",
}

# What each stage imports beyond the standard library (the probe lists those absent)
NEEDS = {
  "kernels": ("pytest", "jax", "flax", "transformers"),
  "llama-lora_jax": ("jax", "flax", "optax"),
  "llama-peft": ("torch", "transformers", "peft"),
  "smollm2": ("jax", "flax", "optax", "orbax", "transformers", "safetensors", "datasets", "yaml",
              "jinja2", "matplotlib", "tqdm"),
}  # fmt: skip
MODULES = sorted({m for needs in NEEDS.values() for m in needs})
NOT_HERE = "not on this platform: "  # a skip that is no fault (the PEFT stages on a TPU)

PROBE = (
  f"MODULES = {MODULES!r}\n"
  + """
import importlib.metadata as md, importlib.util, json, platform
info = {"python": platform.python_version(), "versions": {}}
info["missing"] = [m for m in MODULES if importlib.util.find_spec(m) is None]
for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "transformers",
             "torch", "peft", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu"):
  try:
    info["versions"][dist] = md.version(dist)
  except md.PackageNotFoundError:
    pass
import jax
dev = jax.devices()[0]
info.update(platform=dev.platform, jax_device_kind=dev.device_kind,
            jax_device_count=jax.device_count())
try:
  import torch
  info["torch_cuda"] = torch.cuda.is_available()
  if info["torch_cuda"]:
    info["torch_device"] = torch.cuda.get_device_name()
except ImportError:
  info["torch_cuda"] = False
print("PROBE " + json.dumps(info))
"""
)


class Terminated(Exception):
  """SIGTERM (``timeout`` in bench/device_check.sh): stop the stage, write the JSON, exit."""


@dataclasses.dataclass
class Stage:
  """One subprocess of the check and how to read its figures.

  ``parse(stage, returncode, out)`` returns ``(figures, error or None)``; a stage whose
  figures lack a finite number for a name in ``required`` fails. ``skip``: a reason to record
  instead of running (:data:`NOT_HERE` for a stage the platform has no use for).
  """

  name: str
  group: str
  command: list[str]
  limit_s: float
  parse: Callable[[Stage, int, pathlib.Path], tuple[dict, str | None]]
  env: dict = dataclasses.field(default_factory=dict)
  required: tuple[str, ...] = ()
  skip: str | None = None
  note: str | None = None
  shown: str | None = None  # the command as the JSON shows it, where the real one is unreadable
  data: dict = dataclasses.field(default_factory=dict)  # what parse needs (paths, options)


# ---------------------------------------------------------------------------------------------
# Flags.


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--out", type=pathlib.Path, required=True, help=f"folder for {RESULT} and logs")
  p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: the plumbing only")
  p.add_argument("--stages", default=",".join(GROUPS), help=f"comma list from {list(GROUPS)}")
  p.add_argument("--attention", default=None, help="SmolLM2 runs' choices (default per platform)")
  p.add_argument(
    "--peak_tflops",
    type=float,
    default=_env_float("PEAK_TFLOPS"),
    help="device peak for MFU (default: env PEAK_TFLOPS, else 790 on a GPU, none on a TPU)",
  )
  p.add_argument(
    "--budget",
    type=float,
    default=_env_float("DEVICE_CHECK_BUDGET"),
    help="seconds for all stages (default: env DEVICE_CHECK_BUDGET, else 450; smoke 240)",
  )
  p.add_argument(
    "--kernel_tests",
    default=None,
    help="pytest -k of the kernel tests ('' for all; default: 'not tpu' on a GPU, all on a TPU)",
  )
  p.add_argument("--tokenizer", type=pathlib.Path, default=None, help="SmolLM2 runs' tokenizer")
  p.add_argument(
    "--compile_cache",
    default=None,
    help="JAX compilation cache folder ('' for none; default: one under /tmp, none in smoke)",
  )
  p.add_argument("--platform", choices=PLATFORMS, help="with --dry_run: plan for this platform")
  p.add_argument("--dry_run", action="store_true", help="print the plan as JSON, run nothing")
  return p


def _env_float(name: str) -> float | None:
  value = os.environ.get(name, "")
  try:
    return float(value) if value else None
  except ValueError:
    raise SystemExit(f"device_check: {name}={value!r} is not a number") from None


def _groups(spec: str) -> list[str]:
  groups = [g.strip() for g in spec.split(",") if g.strip()]
  bad = [g for g in groups if g not in GROUPS]
  if bad or not groups:
    raise SystemExit(f"device_check: --stages {spec!r}: unknown {bad}; valid: {list(GROUPS)}")
  return groups


# ---------------------------------------------------------------------------------------------
# Running one stage.


def _kill(proc: subprocess.Popen) -> None:
  """Kills the stage's process group (a worker's own children too)."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()


def _is_number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _last_line(path: pathlib.Path) -> str:
  lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
  return lines[-1][:300] if lines else ""


def execute(stage: Stage, out: pathlib.Path, timeout: float) -> dict:
  """Runs ``stage`` for at most ``timeout`` seconds; its record's status, seconds and figures."""
  logs = out / "logs"
  stdout, stderr = logs / f"{stage.name}.stdout", logs / f"{stage.name}.stderr"
  env = {**os.environ, **OFFLINE, **stage.env}
  t0 = time.monotonic()
  with open(stdout, "w") as so, open(stderr, "w") as se:
    proc = subprocess.Popen(
      stage.command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=so, stderr=se,
      start_new_session=True,
    )  # fmt: skip
    try:
      rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      _kill(proc)
      return {"status": "timeout", "seconds": round(time.monotonic() - t0, 1),
              "error": f"no end within {timeout:.0f} s; killed", "figures": {}}  # fmt: skip
    except BaseException:
      _kill(proc)
      raise
  seconds = round(time.monotonic() - t0, 1)
  try:
    figures, error = stage.parse(stage, rc, out)
  except Exception as e:  # a stage whose outputs cannot be read failed, whatever it returned
    figures, error = {}, None if rc else f"reading its outputs: {type(e).__name__}: {str(e)[:200]}"
  if rc != 0 and error is None:
    error = f"exit {rc}: {_last_line(stderr) or _last_line(stdout)}"
  missing = [k for k in stage.required if not _is_number(figures.get(k))]
  if error is None and missing:
    error = f"no figure for {missing}"
  status = "passed" if error is None else "failed"
  return {"status": status, "seconds": seconds, "error": error, "figures": figures}


# ---------------------------------------------------------------------------------------------
# Probe.


def probe_stage() -> Stage:
  return Stage(
    "probe", "probe", [sys.executable, "-c", PROBE], LIMITS["probe"][0], _parse_probe,
    env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    shown=f"{sys.executable} -c PROBE  # bench/device_check.py's PROBE",
  )  # fmt: skip


def _parse_probe(stage: Stage, rc: int, out: pathlib.Path) -> tuple[dict, str | None]:
  text = (out / "logs" / "probe.stdout").read_text()
  lines = [ln for ln in text.splitlines() if ln.startswith("PROBE ")]
  if not lines:
    return {}, None if rc else "printed no PROBE line"
  return json.loads(lines[-1][len("PROBE ") :]), None


# ---------------------------------------------------------------------------------------------
# Kernel tests.


def kernels_stage(out: pathlib.Path, smoke: bool, select: str) -> Stage:
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--junitxml={out / 'kernels.xml'}", "tests/test_pallas_attention.py"]  # fmt: skip
  if select:  # smoke: one quick case, the plumbing and not the kernels
    cmd += ["-k", select]
  stage = Stage("kernels", "kernels", cmd, _limit("kernels", smoke), _parse_kernels)
  stage.required = ("tests", "passed")
  return stage


def junit_counts(xml_text: str) -> dict:
  """Counts of a pytest junit XML report; ``compiled_*``: the ``interpret=False`` cases.

  Example:
    >>> xml = ('<testsuites><testsuite><testcase name="t[a-True]"/>'
    ...        '<testcase name="t[a-False]"><failure message="x"/></testcase>'
    ...        '<testcase name="u"><skipped/></testcase></testsuite></testsuites>')
    >>> c = junit_counts(xml)
    >>> c["tests"], c["passed"], c["failed"], c["skipped"], c["compiled_tests"], c["failed_names"]
    (3, 1, 1, 1, 1, ['t[a-False]'])
  """
  cases = ET.fromstring(xml_text).iter("testcase")
  counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
  counts.update(compiled_tests=0, compiled_passed=0, failed_names=[])
  for case in cases:
    outcome = "passed"
    for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
      if case.find(tag) is not None:
        outcome = name
        break
    counts["tests"] += 1
    counts[outcome] += 1
    name = case.get("name", "")
    if outcome in ("failed", "errors"):
      counts["failed_names"].append(name)
    if name.endswith("False]"):
      counts["compiled_tests"] += 1
      counts["compiled_passed"] += outcome == "passed"
  return counts


def _parse_kernels(stage: Stage, rc: int, out: pathlib.Path) -> tuple[dict, str | None]:
  counts = junit_counts((out / "kernels.xml").read_text())
  if counts["tests"] == 0:
    return counts, "no test ran"
  bad = counts["failed"] + counts["errors"]
  return counts, f"{bad} of {counts['tests']} failed: {counts['failed_names']}" if bad else None


# ---------------------------------------------------------------------------------------------
# llama-1.1B beside PEFT (bench/train_step.py's workers).


def llama_options(config: str, smoke: bool, peak: float | None) -> dict:
  """The worker options ``bench/train_step.py`` would pass for this run (sequential)."""
  argv = ["--configs", config, "--schedule", "sequential", "--steps", "2" if smoke else "10",
          "--warmup", "1" if smoke else "2"]  # fmt: skip
  if not smoke:
    argv += ["--dtype", "bfloat16", "--base_dtype", "bfloat16"]
  if peak is not None:
    argv += ["--peak_tflops", str(peak)]
  opts = train_step.options(train_step.parser().parse_args(argv))
  opts["config"] = config
  opts["hf_config"] = configs.hf_config(configs.CONFIGS[config], opts)
  return {"argv": argv, "opts": opts}


def llama_stages(platform_: str, smoke: bool, peak: float | None, torch_cuda: bool) -> list:
  config = SMOKE_LLAMA if smoke else LLAMA
  built = llama_options(config, smoke, peak)
  equivalent = "python bench/train_step.py " + shlex.join([*built["argv"], "--peft"])
  stages = []
  for side, compile_ in (("lora_jax", None), ("peft-eager", False), ("peft-compile", True)):
    name = f"llama-{side}"
    module = "bench.jax_step" if compile_ is None else "bench.peft_step"
    opts = built["opts"] if compile_ is None else {**built["opts"], "compile": compile_}
    stage = Stage(
      name, "llama", [sys.executable, "-m", module, json.dumps(opts)], _limit(name, smoke),
      _parse_llama, note=f"as {equivalent}",
      required=("step_ms", "tokens_per_s", "peak_mem_gib") + (("mfu",) if peak else ()),
    )  # fmt: skip
    if compile_ is not None and platform_ == "tpu":
      stage.skip = NOT_HERE + "torch has no TPU device here"
    elif compile_ is not None and platform_ == "gpu" and not torch_cuda:
      stage.skip = "torch sees no CUDA device (a CPU build of torch?)"
    if compile_ and smoke:
      stage.env["TORCH_COMPILE_DISABLE"] = "1"
      stage.note = "smoke: TORCH_COMPILE_DISABLE=1 (Inductor takes ~50 s on 2 CPU cores)"
    stages.append(stage)
  return stages


LLAMA_KEYS = ("step_ms", "step_ms_min", "tokens_per_s", "mfu", "model_tflops_per_s",
              "peak_mem_gib", "mem_source", "compile_s", "final_loss", "device", "tokens",
              "attention", "torch_attention", "versions")  # fmt: skip


def _parse_llama(stage: Stage, rc: int, out: pathlib.Path) -> tuple[dict, str | None]:
  rows = measure.parse_rows((out / "logs" / f"{stage.name}.stdout").read_text())
  if not rows:
    return {}, None if rc else "printed no result row"
  row = rows[-1]
  stage.data["row"] = row
  figures = {k: row[k] for k in LLAMA_KEYS if k in row}
  return figures, row.get("error")


# ---------------------------------------------------------------------------------------------
# The SmolLM2 recipe, per attention implementation.


def smollm2_stages(platform_: str, smoke: bool, choices: str, tokenizer: pathlib.Path,
                   work: pathlib.Path) -> list[Stage]:  # fmt: skip
  model = work / "smollm2-config"
  model.mkdir(parents=True, exist_ok=True)
  (model / "config.json").write_text(json.dumps(SMOKE_SMOLLM2 if smoke else SMOLLM2_135M))
  stages = []
  for attn in [c.strip() for c in choices.split(",") if c.strip()]:
    run_dir = work / f"smollm2-{attn}"
    cmd = [sys.executable, "train/run_clm.py", "--config", RECIPE, "--model_name_or_path", "",
           "--config_name", str(model), "--tokenizer_name", str(tokenizer),
           "--output_dir", str(run_dir), "--overwrite_output_dir",
           "--attn_implementation", attn, "--generation_prompts_file", "",
           "--no-eval_on_start", "--max_eval_samples", "16", "--logging_steps", "1",
           "--no-progress"]  # fmt: skip
    cmd += ["--max_steps", "2"] if smoke else ["--dtype", "bfloat16"]
    stage = Stage(f"smollm2-{attn}", "smollm2", cmd, _limit("smollm2", smoke), _parse_smollm2)
    stage.required = ("tokens_per_s", "loss", "eval_loss")
    stage.data.update(run_dir=run_dir, attention=attn)
    stages.append(stage)
  return stages


def smollm2_figures(metrics: list[dict], results: dict) -> dict:
  """A ``run_clm.py`` run's figures from its ``metrics.jsonl`` rows (``logging_steps 1``) and
  ``eval_results.json``: median tokens/s of the steps after the first (which compiles), the
  tokens/s of the whole loop (compilations included), the losses; ``slow_steps``: steps after
  the first over 3x the median step (most likely compiling a new target-count bucket).

  Example:
    >>> rows = [{"step": s, "loss": 3.0 - s / 10, "tokens_per_s": t, "s_per_step": 1e3 / t,
    ...          "examples_per_s": t / 100} for s, t in [(1, 10.0), (2, 1e3), (3, 2e3), (4, 3e3)]]
    >>> f = smollm2_figures(rows, {"eval_loss": 2.5, "train_runtime_s": 4.0, "train_steps": 4})
    >>> f["tokens_per_s"], f["loss"], f["eval_loss"], f["tokens_per_s_whole_loop"], f["slow_steps"]
    (2000.0, 2.6, 2.5, 1000.0, 0)
  """
  steps = [r for r in metrics if "loss" in r]
  if len(steps) < 2:
    raise ValueError(f"{len(steps)} logged training steps; need 2 or more")
  steady = steps[1:]
  tokens = sum(r["tokens_per_s"] * r["s_per_step"] for r in steps)
  median_s = statistics.median(r["s_per_step"] for r in steady)
  return {
    "steps": results["train_steps"],
    "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1),
    "tokens_per_s_max": max(r["tokens_per_s"] for r in steady),
    "examples_per_s": round(statistics.median(r["examples_per_s"] for r in steady), 2),
    "s_per_step": round(median_s, 4),
    "slow_steps": sum(r["s_per_step"] > 3 * median_s for r in steady),
    "tokens_per_s_whole_loop": round(tokens / results["train_runtime_s"], 1),
    "train_runtime_s": results["train_runtime_s"],
    "first_step_s": steps[0]["s_per_step"],
    "loss_first": steps[0]["loss"],
    "loss": steps[-1]["loss"],
    "eval_loss": results["eval_loss"],
  }


def _parse_smollm2(stage: Stage, rc: int, out: pathlib.Path) -> tuple[dict, str | None]:
  run_dir = stage.data["run_dir"]
  keep = out / "smollm2" / stage.data["attention"]
  keep.mkdir(parents=True, exist_ok=True)
  for name in ("metrics.jsonl", "eval_results.json"):
    if (run_dir / name).exists():
      shutil.copy(run_dir / name, keep / name)
  shutil.rmtree(run_dir, ignore_errors=True)  # the random base alone is 540 MB
  if rc != 0:
    return {"attention": stage.data["attention"]}, None
  metrics = [json.loads(x) for x in (keep / "metrics.jsonl").read_text().splitlines()]
  results = json.loads((keep / "eval_results.json").read_text())
  return {"attention": stage.data["attention"], **smollm2_figures(metrics, results)}, None


# ---------------------------------------------------------------------------------------------
# The plan, the record, the summary.


def _limit(name: str, smoke: bool) -> float:
  return LIMITS[name][1 if smoke else 0]


def plan(args: argparse.Namespace, platform_: str, probe: dict, work: pathlib.Path) -> list:
  """The stages to run after the probe, for ``platform_``."""
  groups = _groups(args.stages)
  peak = _peak(args, platform_)
  stages = []
  if "kernels" in groups:
    select = KERNEL_TESTS[platform_] if args.kernel_tests is None else args.kernel_tests
    stages.append(kernels_stage(args.out, args.smoke, select))
  if "llama" in groups:
    stages += llama_stages(platform_, args.smoke, peak, probe.get("torch_cuda", False))
  if "smollm2" in groups:
    choices = args.attention or ATTENTION[platform_]
    stages += smollm2_stages(platform_, args.smoke, choices, _tokenizer(args), work)
  env = _jax_env(args)
  for stage in stages:
    stage.env = {**env, **stage.env}
    _skip_if_missing(stage, probe.get("missing", []))
  return stages


def _skip_if_missing(stage: Stage, missing: list[str]) -> None:
  """Skips (not a pass) a stage whose modules this python lacks: one clear line, not a trace."""
  key = "llama-peft" if stage.name.startswith("llama-peft") else stage.name
  lacks = [m for m in NEEDS.get(key, NEEDS.get(stage.group, ())) if m in missing]
  if lacks and not stage.skip:
    stage.skip = f"this python lacks {lacks} (pip install them, or run with PYTHON=...)"


def _peak(args: argparse.Namespace, platform_: str) -> float | None:
  if args.peak_tflops is not None:
    return args.peak_tflops
  return SMOKE_PEAK_TFLOPS if args.smoke else PEAK_TFLOPS.get(platform_)


def _tokenizer(args: argparse.Namespace) -> pathlib.Path:
  if args.tokenizer is not None:
    if not args.tokenizer.is_dir():
      raise SystemExit(f"device_check: --tokenizer {str(args.tokenizer)!r} is not a folder")
    return args.tokenizer.resolve()
  if args.smoke:  # tracked files only, as on a device without .cache/
    return WORD_TOKENIZER
  return REAL_TOKENIZER if (REAL_TOKENIZER / "tokenizer.json").is_file() else WORD_TOKENIZER


def _jax_env(args: argparse.Namespace) -> dict:
  cache = args.compile_cache
  if cache is None:
    cache = "" if args.smoke else str(pathlib.Path(tempfile.gettempdir()) / "lora_jax_dc_cache")
  return {"JAX_COMPILATION_CACHE_DIR": cache} if cache else {}


def record(stage: Stage) -> dict:
  return {
    "name": stage.name,
    "group": stage.group,
    "command": stage.shown or shlex.join(stage.command),
    "timeout_s": stage.limit_s,
    "status": "skipped" if stage.skip else "pending",
    "seconds": None,
    "error": stage.skip,
    "note": stage.note,
    "figures": {},
    "logs": [f"logs/{stage.name}.stdout", f"logs/{stage.name}.stderr"],
  }


def summary(stages: list[Stage], records: list[dict]) -> dict:
  """The figures side by side: kernel counts, llama per side (with lora_jax over PEFT), SmolLM2
  per attention choice."""
  by_name = {r["name"]: r for r in records}
  out: dict = {}
  if "kernels" in by_name:
    out["kernels"] = by_name["kernels"]["figures"]
  llama = {r["name"][len("llama-") :]: r["figures"] for r in records if r["group"] == "llama"}
  if llama:
    rows = [s.data["row"] for s in stages if s.group == "llama" and "row" in s.data]
    rows = report.add_ratios([dict(r) for r in rows if "error" not in r])
    ours = next((r for r in rows if r["side"] == "lora_jax"), {})
    keys = ("step_ms", "tokens_per_s", "mfu", "peak_mem_gib")
    out["llama"] = {side: {k: f.get(k) for k in keys} for side, f in llama.items()}
    out["llama"]["lora_jax_vs_peft"] = {k: v for k, v in ours.items() if "_vs_peft_" in k}
  smol = {r["figures"].get("attention", r["name"]): r for r in records if r["group"] == "smollm2"}
  if smol:
    keys = ("tokens_per_s", "loss", "eval_loss")
    out["smollm2"] = {a: {k: r["figures"].get(k) for k in keys} for a, r in smol.items()}
  return out


def header(args: argparse.Namespace, argv: list[str]) -> dict:
  return {
    "command": "python bench/device_check.py " + shlex.join(argv),
    "smoke": args.smoke,
    "started": _now(),
    "finished": None,
    "wall_s": None,
    "budget_s": args.budget,
    "host": platform.node(),
    "cpu_count": os.cpu_count(),
    "git": _git(),
  }


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _git() -> dict | None:
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, timeout=10)  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=10)  # fmt: skip
  except (OSError, subprocess.TimeoutExpired):
    return None
  if head.returncode != 0:
    return None  # a copied working tree without .git
  return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def write(out: pathlib.Path, doc: dict) -> None:
  """``OUT/device_check.json``, replaced whole (a reader never sees half a file)."""
  tmp = out / (RESULT + ".tmp")
  tmp.write_text(json.dumps(doc, indent=1) + "\n")
  tmp.replace(out / RESULT)


def device_info(probe: dict) -> dict:
  keys = ("platform", "jax_device_kind", "jax_device_count", "torch_cuda", "torch_device")
  return {k: probe.get(k) for k in keys}


# ---------------------------------------------------------------------------------------------
# Main.


def _on_sigterm(signum, frame):
  raise Terminated(f"signal {signum}")


def run_all(args, doc: dict, stages: list[Stage], deadline: float, t0: float) -> None:
  """Runs ``stages`` in order within the budget; ``doc`` written after each."""
  doc["stages"] += [record(s) for s in stages]
  records = doc["stages"][-len(stages) :] if stages else []
  for stage, rec in zip(stages, records, strict=True):
    left = deadline - time.monotonic()
    try:
      if stage.skip:
        continue
      if left < MIN_STAGE_S:
        rec.update(status="skipped", error=f"budget: {max(left, 0):.0f} s left of {args.budget} s")
        continue
      rec["status"] = "running"
      write(args.out, doc)
      rec.update(execute(stage, args.out, min(stage.limit_s, left)))
    except Terminated as e:
      rec.update(status="timeout", error=f"the check was stopped ({e}) during this stage")
      raise
    finally:
      doc["summary"] = summary(stages, doc["stages"])
      doc["wall_s"] = round(time.monotonic() - t0, 1)
      write(args.out, doc)
      print(_progress(rec), file=sys.stderr, flush=True)


def _progress(rec: dict) -> str:
  tail = f": {rec['error']}" if rec.get("error") else ""
  seconds = "-" if rec["seconds"] is None else f"{rec['seconds']} s"
  return f"device_check: {rec['name']:<22} {rec['status']:<8} {seconds}{tail}"


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  if args.budget is None:
    args.budget = 240.0 if args.smoke else 450.0
  _groups(args.stages)
  t0 = time.monotonic()
  deadline = t0 + args.budget
  if args.dry_run:
    return dry_run(args)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "logs").mkdir(exist_ok=True)
  signal.signal(signal.SIGTERM, _on_sigterm)
  doc = {**header(args, argv), "platform": None, "device": None, "versions": None,
         "peak_tflops": None, "stages": [], "summary": {}}  # fmt: skip
  work = pathlib.Path(tempfile.mkdtemp(prefix="device_check_"))
  try:
    probe = probe_stage()
    run_all(args, doc, [probe], deadline, t0)
    info = doc["stages"][0]["figures"]
    platform_ = info.get("platform")
    doc.update(platform=platform_, device=device_info(info), versions=info.get("versions"))
    error = _refuse(args, platform_)
    if error:
      doc["error"] = error
      print(f"device_check: {error}", file=sys.stderr)
      return 2
    doc["peak_tflops"] = _peak(args, platform_)
    run_all(args, doc, plan(args, platform_, info, work), deadline, t0)
  except Terminated as e:
    if not any(r["status"] == "timeout" for r in doc["stages"]):
      doc["error"] = f"the check was stopped ({e}) between stages"
    return 3
  finally:
    shutil.rmtree(work, ignore_errors=True)
    for rec in doc["stages"]:
      if rec["status"] == "pending":  # after a stop, or a refused device
        rec.update(status="skipped", error="not reached: the check stopped before it")
    doc.update(finished=_now(), wall_s=round(time.monotonic() - t0, 1))
    doc["ok"] = "error" not in doc and all(
      r["status"] == "passed" or _planned_skip(r) for r in doc["stages"]
    )
    write(args.out, doc)
  return 0 if doc["ok"] else 1


def _planned_skip(rec: dict) -> bool:
  return rec["status"] == "skipped" and str(rec["error"]).startswith(NOT_HERE)


def _refuse(args: argparse.Namespace, platform_: str | None) -> str | None:
  if platform_ is None:
    return "the probe found no JAX device (see logs/probe.stderr)"
  if platform_ == "cpu" and not args.smoke:
    return (
      "no GPU or TPU: jax's platform is 'cpu' (logs/probe.stderr may say why); --smoke runs the "
      "plumbing on CPU"
    )
  if platform_ != "cpu" and args.smoke:
    return f"--smoke is for CPU; this machine has a {platform_}: run without --smoke"
  return None


def dry_run(args: argparse.Namespace) -> int:
  """Prints the stages that would run on ``--platform`` (default gpu) and their limits."""
  platform_ = args.platform or ("cpu" if args.smoke else "gpu")
  with tempfile.TemporaryDirectory() as work:
    stages = plan(args, platform_, {"torch_cuda": platform_ == "gpu"}, pathlib.Path(work))
    rows = [record(s) | {"env": s.env} for s in stages]
  total = sum(s.limit_s for s in stages if not s.skip)
  print(json.dumps({"platform": platform_, "sum_of_limits_s": total, "budget_s": args.budget,
                    "stages": rows}, indent=1))  # fmt: skip
  return 0


if __name__ == "__main__":
  sys.exit(main())
