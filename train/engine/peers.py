"""A watch on the other processes of a multi-process job: one line and an exit when one is lost.

When a process of a job dies (a crash, SIGKILL, a lost machine), the others wait in their next
collective (gloo logs ``Connection closed by peer`` and waits; SIGTERM does not reach Python
there) until JAX's coordination service notices the silence after its heartbeat timeout and
aborts them with a C++ stack trace and pages of errors. :class:`PeerWatch` notices first: each
process publishes a counter in the service's key-value store every second (a daemon thread, so
a main thread busy compiling or stuck in a collective does not stop it) and reads the others'.
A counter that has not moved for ``timeout`` seconds, or a coordinator that stops answering,
names the lost process; :func:`start` then prints that in one line and ends the process with
exit status 1. The checkpoints written before are whole (Orbax writes each into a temporary
folder and renames it when complete), so rerunning every process resumes from the last one.

Example (a fake store in place of ``jax.distributed``'s client):
  >>> class Store:  # what PeerWatch uses of JAX's DistributedRuntimeClient
  ...   def __init__(self): self.kv = {}
  ...   def key_value_set(self, key, value, allow_overwrite=False): self.kv[key] = value
  ...   def key_value_dir_get(self, prefix):
  ...     return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]
  >>> store, now = Store(), [0.0]
  >>> watch0 = PeerWatch(store, 0, 2, timeout=10, clock=lambda: now[0])
  >>> watch1 = PeerWatch(store, 1, 2, timeout=10, clock=lambda: now[0])
  >>> for t in range(12):  # both beat once a second
  ...   now[0] = float(t)
  ...   assert watch0.beat() is None and watch1.beat() is None
  >>> for t in range(12, 30):  # process 1 is gone; process 0 last saw its count change at 12
  ...   now[0] = float(t)
  ...   lost = watch0.beat()
  ...   if lost: break
  >>> t, lost
  (23, 'process 1 of 2 has not been heard from for 11 s (--distributed_timeout 10): it was lost')
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

from train.engine.errors import first_line

PREFIX = "lora_jax/peers/"
DONE = "done"


class PeerWatch:
  """Publishes this process's counter and reads the others' (see the module).

  Args:
    client: JAX's distributed runtime client (``key_value_set``, ``key_value_dir_get``).
    process_id: this process.
    num_processes: processes in the job.
    timeout: seconds of silence after which a process counts as lost.
    clock: seconds, monotonic.
  """

  def __init__(self, client, process_id: int, num_processes: int, timeout: float,
               clock: Callable[[], float] = time.monotonic):  # fmt: skip
    self.client, self.me, self.n, self.timeout, self.clock = (
      client, process_id, num_processes, timeout, clock
    )  # fmt: skip
    self.count = 0
    start = clock()
    self.heard = {p: (None, start) for p in range(num_processes) if p != process_id}

  def beat(self) -> str | None:
    """Publishes the next count and reads the others'; what was lost, in words, or None."""
    self.count += 1
    try:
      self.client.key_value_set(f"{PREFIX}{self.me}", str(self.count), allow_overwrite=True)
      counts = dict(self.client.key_value_dir_get(PREFIX))
    except Exception as e:  # the coordination service (in process 0) does not answer
      why = first_line(e, 200)
      return f"the coordinator (process 0) stopped answering ({why}): it was lost"
    now = self.clock()
    for p, (count, since) in self.heard.items():
      new = counts.get(f"{PREFIX}{p}")
      if new == DONE:
        continue
      if new != count:
        self.heard[p] = (new, now)
      elif now - since > self.timeout:
        return (
          f"process {p} of {self.n} has not been heard from for {now - since:.0f} s "
          f"(--distributed_timeout {self.timeout:g}): it was lost"
        )
    return None

  def finish(self) -> None:
    """Marks this process as ended as planned: the others stop counting its silence."""
    self.client.key_value_set(f"{PREFIX}{self.me}", DONE, allow_overwrite=True)


def client():
  """JAX's distributed runtime client (its key-value store): JAX keeps it in a private module
  (``jax._src.distributed``), where Orbax reads it too."""
  from jax._src import distributed

  if distributed.global_state.client is None:
    raise RuntimeError("jax.distributed is not initialized")
  return distributed.global_state.client


# Errors of a collective whose peer is gone (gloo's, or an RPC to the coordination service).
BROKEN = ("Connection closed by peer", "Connection reset by peer", "Gloo", "UNAVAILABLE")


def broke(error: BaseException) -> bool:
  """Whether ``error`` says a connection to another process broke (a lost process's sign)."""
  return any(s in str(error) for s in BROKEN)


class Watching:
  """A started watch (:func:`start`): :meth:`finish` once this process's work is done, or
  :meth:`end` after a failure."""

  def __init__(self, watch: PeerWatch, stop: threading.Event, interval: float):
    self.watch, self._stop, self.interval = watch, stop, interval

  def end(self, line: str, code: int, error: BaseException) -> NoReturn:
    """Ends this process after ``error``: prints ``line`` and exits with ``code`` at once,
    without ``jax.distributed``'s shutdown barrier, which would wait for every process while the
    others are gone or stuck in a collective that waits for this one (they name it as lost
    after the timeout). An error that says a connection to a peer broke first gives the watch
    up to the timeout to name the lost process (its line and exit status 1 win)."""
    if broke(error):
      time.sleep(self.watch.timeout + 3 * self.interval)
    print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)

  def finish(self) -> None:
    """Stops watching and tells the others that this process ended as planned (they do not
    count it as lost while they finish their own work)."""
    self._stop.set()
    self.watch.finish()


def start(client, process_id: int, num_processes: int, timeout: float, name: str,
          interval: float = 1.0) -> Watching:  # fmt: skip
  """Beats every ``interval`` seconds in a daemon thread; on a loss prints
  ``NAME: error: ...; ... rerun every process to resume`` on stderr and ends the process
  (``os._exit(1)``: the main thread may be stuck in a collective). The watch stops when the
  interpreter exits, before ``jax.distributed`` shuts down (its exit handler runs later)."""
  watch, stop = PeerWatch(client, process_id, num_processes, timeout), threading.Event()

  def run():
    while not stop.wait(interval):
      lost = watch.beat()
      if lost and not stop.is_set():
        print(
          f"{name}: error: {lost}; stopping process {process_id}: the checkpoints written "
          "before are whole, rerun every process to resume",
          file=sys.stderr,
          flush=True,
        )
        sys.stdout.flush()
        os._exit(1)

  atexit.register(stop.set)  # after jax.distributed's own handler: runs before it
  threading.Thread(target=run, name="lora_jax-peer-watch", daemon=True).start()
  return Watching(watch, stop, interval)
