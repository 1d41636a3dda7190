"""Running worker processes: one after another, or in lockstep.

Every worker (``python -m bench.jax_step`` / ``bench.peft_step``) measures one configuration
of one side in a fresh process. ``sequential`` lets each run to completion before the next
starts. ``lockstep`` starts the workers of one configuration one at a time, each building,
compiling and warming up while the others wait idle, then hands out timed steps in turn
(rotating the order each round, with a short pause so that idle thread pools stop spinning):
the step times of both sides then come from the same minutes of a shared, noisy machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from bench import configs
from bench import measure

REPO = pathlib.Path(__file__).resolve().parent.parent
SCHEDULES = ("lockstep", "sequential")
PAUSE_S = 0.02  # between lockstep steps: lets the idle process's spinning threads go to sleep


class Worker:
  """One worker process and the lines it prints, read by a background thread."""

  def __init__(self, cmd: Sequence[str], env: dict):
    self.stderr = tempfile.TemporaryFile(mode="w+")
    self.proc = subprocess.Popen(
      cmd,
      cwd=REPO,
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.stderr,
      text=True,
      bufsize=1,
    )
    self.lines: queue.Queue[str | None] = queue.Queue()
    self.row: dict | None = None
    threading.Thread(target=self._read, daemon=True).start()

  @classmethod
  def of(cls, module: str, opts: dict, env: dict) -> Worker:
    """``python -m module OPTS_JSON``, a step-benchmark worker."""
    cmd = [sys.executable, "-m", module, json.dumps(opts)]
    if opts.get("cpus"):  # pinned before jax / torch is imported (see bench/pin.py)
      cmd[2:2] = ["bench.pin", ",".join(map(str, opts["cpus"]))]
    return cls(cmd, env)

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.put(line.rstrip("\n"))
    self.lines.put(None)

  def expect(self, mark: str, deadline: float) -> str | None:
    """The next line starting with ``mark`` (rest of it); None if the worker ended first."""
    while True:
      try:
        line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.0))
      except queue.Empty:
        self.kill(f"timed out waiting for {mark.strip()}")
        return None
      if line is None:
        return None
      if line.startswith(measure.ROW_MARK):
        self.row = json.loads(line[len(measure.ROW_MARK) :])
        if mark != measure.ROW_MARK:
          return None
      if line.startswith(mark):
        return line[len(mark) :]

  def send(self, text: str) -> bool:
    try:
      self.proc.stdin.write(text + "\n")
      self.proc.stdin.flush()
      return True
    except (BrokenPipeError, OSError):
      return False

  def kill(self, why: str) -> None:
    self.proc.kill()
    self.row = {"error": why}

  def finish(self, deadline: float) -> dict:
    """Waits for the result row; an error row (with the end of stderr) if none came."""
    if self.row is None:
      self.expect(measure.ROW_MARK, deadline)
    try:
      self.proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
      self.kill("timed out at exit")
    if self.row is None:
      self.stderr.seek(0)
      tail = self.stderr.read().strip().splitlines()[-3:]
      self.row = {"error": f"exit {self.proc.returncode}: {' / '.join(tail)}"}
    self.stderr.close()
    return self.row


def _env(module: str, opts: dict) -> dict:
  env = dict(os.environ)
  if module == "bench.jax_step":
    if opts["xla_flags"]:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + opts["xla_flags"]).strip()
    if opts["lockstep"]:  # two processes share the device: JAX must not take 75% up front
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  return env


def run(jobs: Sequence[tuple[str, dict]], steps: int, timeout: float) -> list[dict]:
  """Runs ``(module, opts)`` workers of one configuration; their rows, in the same order.

  ``opts["lockstep"]`` (the same for every job) picks the schedule. Each worker gets the
  model's ``transformers.RobertaConfig`` fields in ``opts["hf_config"]``.
  """
  if not jobs:
    return []
  jobs = [
    (module, {**opts, "hf_config": configs.hf_config(configs.CONFIGS[opts["config"]], opts)})
    for module, opts in jobs
  ]
  if not jobs[0][1]["lockstep"]:
    rows = []
    for module, opts in jobs:
      worker = Worker.of(module, opts, _env(module, opts))
      rows.append(worker.finish(time.monotonic() + timeout))
    return rows
  workers = []
  for module, opts in jobs:  # set up one at a time: compile times are not disturbed
    worker = Worker.of(module, opts, _env(module, opts))
    ok = worker.expect(measure.READY_MARK, time.monotonic() + timeout) is not None
    workers.append((worker, ok))
  live = [w for w, ok in workers if ok]
  deadline = time.monotonic() + timeout
  for k in range(steps):
    for worker in live[k % len(live) :] + live[: k % len(live)] if live else []:
      time.sleep(PAUSE_S)
      if not worker.send(measure.GO) or worker.expect(measure.STEP_MARK, deadline) is None:
        live.remove(worker)
  return [w.finish(deadline) for w, _ in workers]
