"""The device check (``bench/device_check.sh``): its plan per platform, its stage runner (time
limits, budget, unreadable outputs), and the whole script in ``--smoke`` mode on CPU, whose JSON
must hold every stage with a status and numeric figures. No timing assertions."""

import argparse
import doctest
import json
import math
import pathlib
import subprocess
import sys
import time

import pytest
from conftest import REPO
from conftest import one_device_env

sys.path.insert(0, str(REPO))

from bench import device_check  # noqa: E402

SMOKE_STAGES = [
  "probe", "kernels", "llama-lora_jax", "llama-peft-eager", "llama-peft-compile", "smollm2-xla",
]  # fmt: skip


def _args(tmp_path, *argv: str) -> argparse.Namespace:
  args = device_check.parser().parse_args(["--out", str(tmp_path), *argv])
  args.budget = args.budget or 450.0
  return args


def test_doctests():
  assert doctest.testmod(device_check).failed == 0


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_the_plan_per_platform(tmp_path, platform):
  """A GPU runs all three llama sides and three attention choices; a TPU skips the PEFT sides
  (with the reason) and cuDNN. Every limit fits the budget, and each stage's time is capped."""
  args = _args(tmp_path)
  stages = device_check.plan(args, platform, {"torch_cuda": platform == "gpu"}, tmp_path)
  names = [s.name for s in stages]
  attention = ["pallas", "cudnn", "xla"] if platform == "gpu" else ["pallas", "xla"]
  llama = ["llama-lora_jax", "llama-peft-eager", "llama-peft-compile"]
  assert names == ["kernels", *llama, *[f"smollm2-{a}" for a in attention]]
  skipped = {s.name: s.skip for s in stages if s.skip}
  if platform == "gpu":
    assert skipped == {}
    assert '"peak_tflops": 790.0' in stages[1].command[-1]
  else:
    assert skipped == {n: "not on this platform: torch has no TPU device here" for n in llama[1:]}
    assert '"peak_tflops": null' in stages[1].command[-1]  # no default TPU peak
  assert all(s.limit_s <= args.budget for s in stages)
  kernels = stages[0].command  # a GPU leaves the TPU kernel's CPU checks to CI
  assert kernels[-2:] == ["-k", "not tpu"] if platform == "gpu" else "-k" not in kernels
  assert all("bfloat16" in s.command for s in stages if s.group == "smollm2")


def test_a_stage_whose_modules_are_absent_is_skipped_and_not_ok(tmp_path):
  """A device image without pytest or datasets: those stages say so in one line, and the run
  is not ok (the PEFT stages on a TPU are skipped and ok)."""
  probe = {"torch_cuda": True, "missing": ["datasets", "pytest"]}
  stages = {s.name: s for s in device_check.plan(_args(tmp_path), "gpu", probe, tmp_path)}
  assert stages["kernels"].skip == (
    "this python lacks ['pytest'] (pip install them, or run with PYTHON=...)"
  )
  assert "['datasets']" in stages["smollm2-xla"].skip and not stages["llama-lora_jax"].skip
  records = [device_check.record(s) for s in stages.values()]
  assert not any(device_check._planned_skip(r) for r in records)
  tpu = device_check.plan(_args(tmp_path), "tpu", {}, tmp_path)
  assert [s.name for s in tpu if device_check._planned_skip(device_check.record(s))] == [
    "llama-peft-eager", "llama-peft-compile",
  ]  # fmt: skip


def test_the_planned_run_clm_commands_parse(tmp_path):
  """Each SmolLM2 stage's flags are ones run_clm.py takes (a GPU's cuDNN run in bf16 too)."""
  from train.tasks.clm import args as clm_args

  stages = device_check.plan(_args(tmp_path, "--stages", "smollm2"), "gpu", {}, tmp_path)
  for stage in stages:
    assert stage.command[1] == "train/run_clm.py"
    args = clm_args.parse_args(stage.command[2:])
    model = stage.command[stage.command.index("--config_name") + 1]
    assert (args.dtype, args.max_steps, args.config_name) == ("bfloat16", 30, model)
    assert args.attn_implementation == stage.name.removeprefix("smollm2-")


def _stage(name: str, code: str, parse=None, limit: float = 30) -> device_check.Stage:
  def figures(stage, rc, out):
    return {"answer": float((out / "logs" / f"{name}.stdout").read_text())}, None

  return device_check.Stage(name, "test", [sys.executable, "-c", code], limit, parse or figures)


def _run(tmp_path, stages, budget: float = 60) -> list[dict]:
  (tmp_path / "logs").mkdir(exist_ok=True)
  args = _args(tmp_path, "--budget", str(budget))
  doc = {"stages": [], "summary": {}}
  t0 = time.monotonic()
  device_check.run_all(args, doc, stages, t0 + budget, t0)
  assert json.loads((tmp_path / device_check.RESULT).read_text())["stages"] == doc["stages"]
  return doc["stages"]


def test_a_stage_passes_fails_times_out_or_is_skipped(tmp_path):
  """Its figures when it works; the last stderr line when it exits non-zero; killed at its
  limit; outputs it cannot read, or a required figure missing, fail it even with exit 0;
  skipped once the budget is spent."""

  def no_figure(stage, rc, out):
    raise KeyError("tokens_per_s")

  silent = _stage("silent", "print(7)")
  silent.required = ("answer", "tokens_per_s")
  stages = [
    _stage("ok", "print(42)"),
    silent,
    _stage("exits", "import sys; sys.exit('the kernel is wrong')"),
    _stage("hangs", "import time; time.sleep(60)", limit=1),
    _stage("no_figure", "print(1)", parse=no_figure),
  ]
  recs = {r["name"]: r for r in _run(tmp_path, stages)}
  assert (recs["ok"]["status"], recs["ok"]["figures"]) == ("passed", {"answer": 42.0})
  assert recs["silent"]["status"] == "failed"
  assert recs["silent"]["error"] == "no figure for ['tokens_per_s']"
  assert recs["exits"]["status"] == "failed"
  assert recs["exits"]["error"] == "exit 1: the kernel is wrong"
  assert recs["hangs"]["status"] == "timeout" and recs["hangs"]["seconds"] < 10
  assert recs["no_figure"]["status"] == "failed"
  assert recs["no_figure"]["error"] == "reading its outputs: KeyError: 'tokens_per_s'"
  late = _run(tmp_path, [_stage("late", "print(1)")], budget=device_check.MIN_STAGE_S - 1)
  assert late[0]["status"] == "skipped" and late[0]["error"].startswith("budget: ")


def test_bad_flags_are_one_line_errors(tmp_path):
  with pytest.raises(SystemExit, match=r"--stages 'kernels,gpu': unknown \['gpu'\]; valid: "):
    device_check.main(["--out", str(tmp_path), "--stages", "kernels,gpu", "--dry_run"])
  args = _args(tmp_path, "--tokenizer", str(tmp_path / "absent"), "--stages", "smollm2")
  with pytest.raises(SystemExit, match="--tokenizer '.*absent' is not a folder"):
    device_check.plan(args, "gpu", {}, tmp_path)


def _number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One ``bash bench/device_check.sh OUT --smoke`` run (about 90 s on 2 busy CPU cores)."""
  out = tmp_path_factory.mktemp("device_check")
  env = one_device_env()
  cmd = ["bash", str(REPO / "bench" / "device_check.sh"), str(out), "--smoke"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
  return proc, out


@pytest.mark.slow
def test_smoke_writes_every_stage_with_its_figures_and_a_summary(smoke):
  proc, out = smoke
  doc = json.loads((out / device_check.RESULT).read_text())
  stages = {r["name"]: r for r in doc["stages"]}
  assert list(stages) == SMOKE_STAGES
  bad = {n: (r["status"], r["error"]) for n, r in stages.items() if r["status"] != "passed"}
  assert not bad, bad
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert doc["ok"] and doc["platform"] == "cpu" and doc["device"]["jax_device_kind"] == "cpu"
  assert doc["finished"] and _number(doc["wall_s"]) and doc["versions"]["jax"]
  for r in stages.values():
    assert (
      r["status"] in device_check.STATUSES
      and _number(r["seconds"])
      and r["command"]
      and (out / r["logs"][1]).is_file()
    )
  kernels = stages["kernels"]["figures"]
  assert kernels["tests"] == kernels["passed"] >= 1 and kernels["failed"] == 0
  for side in ("lora_jax", "peft-eager", "peft-compile"):
    figures = stages[f"llama-{side}"]["figures"]
    for key in ("step_ms", "tokens_per_s", "mfu", "peak_mem_gib", "final_loss"):
      assert _number(figures.get(key)) and figures[key] > 0, (side, key, figures.get(key))
  smol = stages["smollm2-xla"]["figures"]
  for key in ("tokens_per_s", "loss", "eval_loss", "steps", "tokens_per_s_whole_loop"):
    assert _number(smol.get(key)) and smol[key] > 0, (key, smol.get(key))
  assert (out / "smollm2" / "xla" / "metrics.jsonl").is_file()
  # the summary sets the figures side by side (one smoke run for both checks: under xdist two
  # tests could each start one)
  summary = doc["summary"]
  assert set(summary) == {"kernels", "llama", "smollm2"}
  llama = summary["llama"]
  for side in ("lora_jax", "peft-eager", "peft-compile"):
    assert all(_number(llama[side][k]) for k in ("step_ms", "tokens_per_s", "mfu"))
  ratios = llama["lora_jax_vs_peft"]
  assert _number(ratios["speed_vs_peft_eager"]) and _number(ratios["speed_vs_peft_compile"])
  assert all(_number(v) for v in summary["smollm2"]["xla"].values())


def test_off_an_accelerator_without_smoke_it_refuses_with_one_line(tmp_path):
  """A CPU machine: the probe runs, then exit 2 and the reason, in the JSON and on stderr."""
  env = one_device_env()
  cmd = ["bash", str(REPO / "bench" / "device_check.sh"), str(tmp_path), "--stages", "kernels"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  want = (
    "no GPU or TPU: jax's platform is 'cpu' (logs/probe.stderr may say why); --smoke runs the "
    "plumbing on CPU"
  )
  assert proc.stderr.strip().splitlines()[-1] == f"device_check: {want}"
  doc = json.loads((tmp_path / device_check.RESULT).read_text())
  assert (doc["error"], doc["ok"], [r["name"] for r in doc["stages"]]) == (want, False, ["probe"])


def test_the_hard_stop_leaves_the_json_with_the_stage_it_cut(tmp_path):
  """bench/device_check.sh's hard limit: the stage in flight reads timeout, later ones skipped,
  exit 3; whatever stage that is (the probe alone takes seconds on a busy machine), or the
  reason in the JSON's error when the stop came between stages."""
  env = one_device_env(DEVICE_CHECK_HARD_S="8")
  cmd = ["bash", str(REPO / "bench" / "device_check.sh"), str(tmp_path), "--smoke"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 3, proc.stderr[-2000:]
  doc = json.loads((tmp_path / device_check.RESULT).read_text())
  statuses = [r["status"] for r in doc["stages"]]
  assert doc["ok"] is False and doc["finished"]
  if "timeout" not in statuses:  # stopped while planning, after the probe
    assert doc["error"] == "the check was stopped (signal 15) between stages"
    return
  cut = statuses.index("timeout")
  assert set(statuses[:cut]) <= {"passed"} and set(statuses[cut + 1 :]) <= {"skipped"}
  assert doc["stages"][cut]["error"] == "the check was stopped (signal 15) during this stage"


def test_the_script_names_its_usage():
  head = (REPO / "bench" / "device_check.sh").read_text().split("set -uo")[0]
  assert "Usage" in head and "--smoke" in head and "device_check.json" in head
  assert pathlib.Path(device_check.__file__).name == "device_check.py"
