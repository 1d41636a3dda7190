"""Real multi-process runs through train/launch.py (slow, run by .ci/run): the CLM quickstart as
1 process x 4 CPU devices and as 2 processes x 2 (gloo) gives the same losses and adapter, with
process 0 the only writer; a process killed mid-run ends the others with one line, and the
job resumes."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file

from train.engine import outputs

CONFIG = str(REPO / "configs" / "clm_quickstart.yaml")
# 8 rows a step over 4 devices (2 each), one logged loss a step, no evaluation before the end and
# a small one then, q/v adapters only: about 30 s a run on 2 shared CPU cores.
SMALL = ("--max_steps", "8", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "4",
         "--lora_dropout", "0", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
         "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "16",
         "--generation_prompts_file", "", "--parallel", "mesh", "--shard_frozen",
         "--no-progress")  # fmt: skip


# The GLUE quickstart the same way: 12 steps of 8 rows, 13 validation and 13 test rows.
GLUE = ("train/run_glue.py", "--config", str(REPO / "configs" / "quickstart.yaml"),
        "--max_steps", "12", "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "4",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "16",
        "--max_eval_samples", "13", "--max_predict_samples", "13", "--parallel", "mesh",
        "--shard_frozen", "--no-progress")  # fmt: skip


def _launch(nproc, devices, out, *extra, command=("train/run_clm.py", "--config", CONFIG, *SMALL),
            timeout=300):  # fmt: skip
  argv = [sys.executable, "-m", "train.launch", "--nproc", str(nproc), "--devices_per_proc",
          str(devices), "--", *command, "--output_dir", str(out), *extra]  # fmt: skip
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _files(out: pathlib.Path) -> list[str]:
  """The run's files; the checkpoints' data files (``.../d/HASH``, as many as OCDBT makes them)
  by folder only."""
  files = (p.relative_to(out) for p in out.rglob("*") if p.is_file())
  return sorted({str(f.parent / "*") if f.parent.name == "d" else str(f) for f in files})


def _same_run(one: pathlib.Path, two: pathlib.Path, steps: int) -> None:
  """``two`` (2 processes x 2 devices) logged, evaluated and wrote what ``one`` (1 x 4) did."""
  rows = {n: outputs.read_jsonl(n / "metrics.jsonl") for n in (one, two)}
  # every step logged once: no row missing, none written twice (by a second writer)
  train_rows = [r for r in rows[two] if "loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
  assert len(rows[two]) == len(rows[one])
  ref = [r["loss"] for r in rows[one] if "loss" in r]
  np.testing.assert_allclose([r["loss"] for r in train_rows], ref, atol=1e-5, rtol=0)
  # the evaluation saw every validation example once: none dropped, none counted twice
  evals = {n: [r for r in rows[n] if "eval_loss" in r] for n in rows}
  assert [sorted(r) for r in evals[two]] == [sorted(r) for r in evals[one]] and evals[one]
  for a, b in zip(evals[one], evals[two], strict=True):
    for key in a:
      if key.startswith("eval_") and not key.endswith("runtime_s"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=0, err_msg=key)
  assert _files(two) == _files(one)  # nothing more, nothing less
  a, b = (load_file(n / "adapter" / "adapter_model.safetensors") for n in (one, two))
  assert a.keys() == b.keys() and a
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=1e-6, rtol=0, err_msg=k)


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
  # 13 validation rows: a count that the processes (and devices) do not divide
  one = _launch(1, 4, tmp_path / "1x4", "--max_eval_samples", "13")
  assert one.returncode == 0, one.stderr[-3000:]
  two = _launch(2, 2, tmp_path / "2x2", "--max_eval_samples", "13")
  assert two.returncode == 0, two.stderr[-3000:]
  assert "error" not in two.stderr.lower(), two.stderr[-3000:]
  # the results line comes from each process; the same numbers
  results = sorted(line for line in two.stdout.splitlines() if "eval_loss=" in line)
  assert [r[:5] for r in results] == ["[p0] ", "[p1] "], two.stdout
  _same_run(tmp_path / "1x4", tmp_path / "2x2", steps=8)
  # two processes start from the checkpoint and the adapter one process wrote (each process
  # reads its own copy: the loaders placed it on device 0, which process 1 does not have)
  base, adapter = (str(tmp_path / "1x4" / n) for n in ("base_model", "adapter"))
  again = _launch(2, 2, tmp_path / "again", "--max_eval_samples", "13", "--config_name", "",
                  "--model_name_or_path", base, "--adapter_name_or_path", adapter,
                  "--max_steps", "1", "--eval_on_start")  # fmt: skip
  assert again.returncode == 0, again.stderr[-3000:]
  start = next(
    r for r in outputs.read_jsonl(tmp_path / "again" / "metrics.jsonl") if r["step"] == 0
  )
  end = outputs.read_jsonl(tmp_path / "1x4" / "metrics.jsonl")[-1]
  np.testing.assert_allclose(start["eval_loss"], end["eval_loss"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_processes_train_the_glue_quickstart_as_one(tmp_path):
  """The same for run_glue.py: losses, the evaluation of 13 rows (accuracy included), the test
  predictions (process 0 writes them), the adapter."""
  for name, nproc, devices in (("1x4", 1, 4), ("2x2", 2, 2)):
    run = _launch(nproc, devices, tmp_path / name, command=GLUE)
    assert run.returncode == 0, run.stderr[-3000:]
  _same_run(tmp_path / "1x4", tmp_path / "2x2", steps=12)
  predictions = {n: sorted((tmp_path / n).glob("predict_results*")) for n in ("1x4", "2x2")}
  assert len(predictions["1x4"]) == 1, _files(tmp_path / "1x4")
  assert predictions["2x2"][0].read_text() == predictions["1x4"][0].read_text()


@pytest.mark.slow
def test_a_lost_process_ends_the_others_with_one_line_and_two_processes_resume(tmp_path):
  """Two processes started by hand (as Slurm or SSH would, no launcher to stop the rest);
  process 1 is SIGKILLed after the first checkpoint. Process 0, stuck in a collective or failing
  in it, ends within --distributed_timeout with one line naming process 1, exit status 1
  (before: JAX's abort with a C++ stack trace, 83 s later). Then both processes rerun the same
  command, resume from the checkpoint and end as the uninterrupted run did."""
  from train.launch import child_env
  from train.launch import free_port

  out, timeout, steps = tmp_path / "run", 10, "24"
  argv = [sys.executable, "train/run_clm.py", "--config", CONFIG, *SMALL, "--max_steps", steps,
          "--distributed_timeout", str(timeout), "--output_dir", str(out)]  # fmt: skip
  address = f"127.0.0.1:{free_port()}"
  procs = [
    subprocess.Popen(
      argv,
      cwd=REPO,
      env=child_env(os.environ, address, 2, i, 2),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for i in range(2)
  ]
  try:
    first = out / "checkpoints" / "4"
    deadline = time.time() + 240
    while not first.is_dir() and time.time() < deadline and procs[0].poll() is None:
      time.sleep(0.05)
    assert first.is_dir(), "the run never wrote its first checkpoint"
    procs[1].kill()
    killed = time.time()
    err = procs[0].communicate(timeout=timeout + 60)[1]
    ended = time.time() - killed
  finally:  # a hung process must not outlive the test
    for proc in procs:
      proc.kill()
  assert procs[0].returncode == 1, err[-3000:]
  assert ended < timeout + 15, ended
  lines = err.strip().splitlines()
  assert re.fullmatch(
    r"run_clm.py: error: process 1 of 2 has not been heard from for \d+ s "
    rf"\(--distributed_timeout {timeout}\): it was lost; stopping process 0: the checkpoints "
    r"written before are whole, rerun every process to resume",
    lines[-1],
  ), lines[-5:]
  assert all(" INFO " in line for line in lines[:-1]), err[-3000:]  # no traceback, no abort
  steps_done = [r["step"] for r in outputs.read_jsonl(out / "metrics.jsonl") if "loss" in r]
  assert 4 <= max(steps_done) < int(steps), "the run was not killed before its end"
  # both processes rerun the same command: they resume and end as an uninterrupted run
  again = _launch(2, 2, out, "--max_steps", steps, "--distributed_timeout", str(timeout))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming from" in again.stderr
  whole = _launch(1, 4, tmp_path / "whole", "--max_steps", steps)
  assert whole.returncode == 0, whole.stderr[-3000:]
  rows = {n: outputs.read_jsonl(tmp_path / n / "metrics.jsonl") for n in ("run", "whole")}
  last = {n: [r for r in rows[n] if "loss" in r][-1] for n in rows}
  assert last["run"]["step"] == last["whole"]["step"] == int(steps)
  np.testing.assert_allclose(last["run"]["loss"], last["whole"]["loss"], atol=1e-5, rtol=0)
  evals = {n: [r["eval_loss"] for r in rows[n] if "eval_loss" in r][-1] for n in rows}
  np.testing.assert_allclose(evals["run"], evals["whole"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_an_unreachable_coordinator_is_one_line_and_exit_2(tmp_path):
  """Process 1 of 2, process 0 never started: about 5 s (the imports), not JAX's abort."""
  from train.launch import free_port

  address = f"127.0.0.1:{free_port()}"
  env = {**os.environ, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # fmt: skip
  start = time.monotonic()
  done = subprocess.run([sys.executable, "train/run_clm.py", "--config", CONFIG, "--output_dir",
                         str(tmp_path / "out"), "--distributed_timeout", "2", "--no-progress"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
  assert time.monotonic() - start < 60
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr == (
    f"run_clm.py: error: cannot reach the coordinator at {address} (JAX_COORDINATOR_ADDRESS) "
    "within 2 s (Connection refused); is process 0 running? (--distributed_timeout)\n"
  )
  assert not (tmp_path / "out").exists()
