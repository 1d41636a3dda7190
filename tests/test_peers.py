"""train.engine.peers on a fake key-value store: who counts as lost, when, and how the process
ends (the real two-process run is in tests/test_multiprocess.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from conftest import REPO

from train.engine import peers


class Store:
  """What PeerWatch uses of JAX's DistributedRuntimeClient; ``down`` makes every call fail as
  one to a coordinator that is gone."""

  def __init__(self):
    self.kv, self.down = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses\nmore")
    assert allow_overwrite
    self.kv[key] = value

  def key_value_dir_get(self, prefix):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
    return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watches(n, timeout=5.0):
  store, now = Store(), [0.0]
  return store, now, [peers.PeerWatch(store, p, n, timeout, clock=lambda: now[0]) for p in range(n)]


def test_a_silent_process_is_named_after_the_timeout_and_not_before():
  _, now, (w0, w1, w2) = _watches(3)
  for t in range(3):
    now[0] = float(t)
    assert [w.beat() for w in (w0, w1, w2)] == [None] * 3
  for t in range(3, 9):  # process 2 stops; process 0 last heard something new from it at t=3
    now[0] = float(t)
    assert w0.beat() is None and w1.beat() is None, t
  now[0] = 9.0
  assert w0.beat() == (
    "process 2 of 3 has not been heard from for 6 s (--distributed_timeout 5): it was lost"
  )
  assert w1.beat().startswith("process 2 of 3 ")


def test_a_process_not_yet_started_counts_from_the_watch_start():
  _, now, (w0, _) = _watches(2)
  now[0] = 5.0
  assert w0.beat() is None
  now[0] = 5.5
  assert w0.beat().startswith("process 1 of 2 has not been heard from for 6 s")


def test_a_finished_process_is_never_lost():
  _, now, (w0, w1) = _watches(2)
  assert w0.beat() is None and w1.beat() is None
  w1.finish()  # process 1 is done; process 0 still writes its outputs
  for t in range(1, 60):
    now[0] = float(t)
    assert w0.beat() is None


def test_a_coordinator_that_stops_answering_is_named_in_one_line():
  store, _, (_, w1) = _watches(2)
  assert w1.beat() is None
  store.down = True
  assert w1.beat() == (
    "the coordinator (process 0) stopped answering (UNAVAILABLE: failed to connect to all "
    "addresses): it was lost"
  )


def _run(body: str) -> subprocess.CompletedProcess:
  script = f"import sys, time\nsys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(body)
  return subprocess.run([sys.executable, "-c", script], cwd=REPO / "tests", capture_output=True,
                        text=True, timeout=60)  # fmt: skip


def test_a_loss_ends_a_stuck_process_with_one_line_and_exit_1():
  start = time.monotonic()
  proc = _run("""
    from train.engine import peers
    from test_peers import Store
    peers.start(Store(), 0, 2, timeout=0.5, name="run_clm.py", interval=0.05)
    time.sleep(60)  # as a main thread stuck in a collective
  """)
  assert time.monotonic() - start < 30
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr == (
    "run_clm.py: error: process 1 of 2 has not been heard from for 1 s (--distributed_timeout "
    "0.5): it was lost; stopping process 0: the checkpoints written before are whole, rerun "
    "every process to resume\n"
  )


def test_the_watch_stops_before_jax_distributed_shuts_down():
  """jax.distributed's exit handler stops the coordinator; a beat after that would name a loss
  that is none. The watch's own handler, registered later, runs first and stops it."""
  proc = _run("""
    import atexit
    from train.engine import peers
    from test_peers import Store
    store = Store()
    def shutdown():  # as jax.distributed.shutdown, registered by jax.distributed.initialize
      store.down = True
      time.sleep(0.5)
    atexit.register(shutdown)
    peers.start(store, 0, 2, timeout=60, name="run_clm.py", interval=0.05)
    time.sleep(0.2)
  """)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
