"""Process-level measurements shared by both benchmark workers (no jax, no torch here).

CPU memory is the process's resident set (Linux ``/proc/self/status``): ``VmHWM`` is its
high-water mark, and writing ``5`` to ``/proc/self/clear_refs`` resets that mark to the current
RSS, so a worker can reset it after warm-up and read the peak of the timed steps alone, as the
PEFT baseline does on GPU with ``torch.cuda.reset_peak_memory_stats()``. The RSS includes the
framework itself (libraries, compiled code, the XLA or Inductor compiler's leftovers), so each
worker also records the RSS right after importing its framework (``rss_base_gib``).
"""

from __future__ import annotations

import ctypes
import json
import re
import statistics
import sys
import time
from collections.abc import Callable

GIB = 2**30
# The worker -> parent protocol on stdout (other lines are ignored) and the parent's reply.
ROW_MARK = "BENCH_ROW "  # the result row, as JSON, printed once at the end
READY_MARK = "BENCH_READY"  # lockstep: built, compiled and warmed up
STEP_MARK = "BENCH_STEP "  # lockstep: seconds of the step just run
GO = "go"  # lockstep: the parent's "run one timed step" on the worker's stdin


def _status_kib(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
  except OSError:
    return None
  return int(m.group(1)) if m else None


def rss_gib() -> float | None:
  """Current resident set size in GiB (None where /proc is unavailable)."""
  kib = _status_kib("VmRSS")
  return None if kib is None else kib * 1024 / GIB


def peak_rss_gib() -> float | None:
  """Resident-set high-water mark since the start or the last :func:`reset_peak_rss`."""
  kib = _status_kib("VmHWM")
  return None if kib is None else kib * 1024 / GIB


def reset_peak_rss() -> bool:
  """Resets the RSS high-water mark to the current RSS; False where the kernel refuses."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def trim_heap() -> bool:
  """Returns freed C heap to the OS (glibc ``malloc_trim(0)``); both workers call it after
  warm-up, so the RSS of the timed steps counts live memory rather than what compilation freed
  but the allocator kept. False where glibc is not the allocator."""
  try:
    return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
  except (OSError, AttributeError):
    return False


class Baton:
  """The timed steps' schedule, as the parent process asked for it.

  Sequential (``lockstep=False``): steps run back to back. Lockstep: the worker announces it is
  ready (built, compiled, warmed up), then before each timed step waits for a ``go`` line on
  stdin and afterwards reports the step's seconds, so that the parent can alternate the steps
  of the lora_jax and PEFT processes and a busy shared CPU slows both sides alike.
  """

  def __init__(self, lockstep: bool):
    self.lockstep = lockstep

  def ready(self) -> None:
    if self.lockstep:
      print(READY_MARK, flush=True)

  def wait(self) -> None:
    if self.lockstep and sys.stdin.readline().strip() != GO:
      raise SystemExit("lockstep: the parent process stopped sending 'go'")

  def report(self, seconds: float) -> None:
    if self.lockstep:
      print(f"{STEP_MARK}{seconds!r}", flush=True)


def time_steps(step: Callable[[], None], steps: int, baton: Baton | None = None) -> list[float]:
  """Seconds per call of ``step`` (which must synchronise the device before returning)."""
  times = []
  for _ in range(steps):
    if baton:
      baton.wait()
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
    if baton:
      baton.report(times[-1])
  return times


def summarize(times: list[float], tokens: int) -> dict:
  """Median / min / max step time in ms and tokens per second at the median."""
  med = statistics.median(times)
  return {
    "step_ms": round(med * 1e3, 3),
    "step_ms_min": round(min(times) * 1e3, 3),
    "step_ms_max": round(max(times) * 1e3, 3),
    "tokens_per_s": round(tokens / med, 1),
  }


def rounded(x: float | None, digits: int = 4) -> float | None:
  return None if x is None else round(x, digits)


def emit(row: dict) -> None:
  """Prints ``row`` as the worker's result line (the parent process parses it)."""
  print(ROW_MARK + json.dumps(row), flush=True)


def parse_rows(stdout: str) -> list[dict]:
  """The result lines a worker printed."""
  return [json.loads(ln[len(ROW_MARK) :]) for ln in stdout.splitlines() if ln.startswith(ROW_MARK)]


def fail(row: dict, err: BaseException) -> None:
  """Emits ``row`` with the error, so one failing configuration does not hide the others."""
  emit({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"})
  sys.exit(1)
