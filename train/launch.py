"""Start a multi-process job on this machine: ``python -m train.launch --nproc 2 -- SCRIPT ARGS``.

Each of the ``--nproc`` processes runs the same command with the environment a training script
reads to join the job (:func:`train.engine.parallel.maybe_initialize_distributed`):
``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`` (a free port picked here), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; with ``--devices_per_proc K`` also ``JAX_PLATFORMS=cpu`` and
``JAX_NUM_CPU_DEVICES=K`` (K CPU devices each; gloo is JAX's CPU collective). A command whose
first word ends in ``.py`` (or is ``-m`` or ``-c``) runs with this Python.

Each line a process prints comes out prefixed with ``[pI] `` (its process id), on stdout or
stderr as it was written. Ctrl-C and SIGTERM are passed on to every process. When one process
exits with a non-zero status or is killed, the launcher prints one line naming it, stops the
others (SIGTERM, then SIGKILL after ``--grace`` seconds) and exits with that status (a signal N
counts as 128 + N); otherwise with the worst status of all. Bad flags: one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from train.cli.flags import OneLineParser
from train.cli.flags import positive_int

PROG = "launch"


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The launcher's flags before ``--``, the command after it.

  Example:
    >>> a = parse_args(["--nproc", "2", "--", "train/run_clm.py", "--max_steps", "3"])
    >>> a.nproc, a.devices_per_proc, a.command
    (2, None, ['train/run_clm.py', '--max_steps', '3'])
  """
  parser = OneLineParser(
    prog=PROG,
    usage=f"python -m train.{PROG} --nproc N [--devices_per_proc K] [--grace S] -- SCRIPT ARGS...",
    description="Run SCRIPT as N processes of one JAX job on this machine.",
  )
  parser.add_argument("--nproc", type=positive_int, required=True, help="processes to start")
  parser.add_argument(
    "--devices_per_proc",
    type=positive_int,
    help="CPU devices per process (JAX_PLATFORMS=cpu, JAX_NUM_CPU_DEVICES); if not given: "
    "each process sees the platform's devices as JAX finds them",
  )
  parser.add_argument(
    "--grace",
    type=float,
    default=5.0,
    help="seconds the other processes get to stop (SIGTERM) before SIGKILL when one fails",
  )
  if "--" not in argv:
    parser.error("the command to run goes after '--' (e.g. -- train/run_clm.py ARGS...)")
  cut = argv.index("--")
  args = parser.parse_args(argv[:cut])
  args.command = argv[cut + 1 :]
  if not args.command:
    parser.error("no command after '--'")
  if not args.grace >= 0:
    parser.error(f"argument --grace: must be >= 0, got {args.grace}")
  return args


def free_port() -> int:
  """A TCP port free on 127.0.0.1 now (bound to port 0, read, closed)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(environ, address: str, nproc: int, index: int, devices: int | None) -> dict:
  """Process ``index``'s environment: ``environ`` with the job's variables set."""
  env = dict(environ)
  env.update(
    JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(nproc), JAX_PROCESS_ID=str(index)
  )
  if devices is not None:
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    # the XLA flag would contradict JAX_NUM_CPU_DEVICES: drop it
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = " ".join(flags.split())
  return env


def command_line(command: list[str]) -> list[str]:
  """``command`` with this Python in front of a ``.py`` script, ``-m module`` or ``-c code``."""
  if command[0].endswith(".py") or command[0] in ("-m", "-c"):
    return [sys.executable, *command]
  return list(command)


def exit_status(returncode: int) -> int:
  """A shell's view of a status: killed by signal N (``-N``) -> 128 + N."""
  return 128 - returncode if returncode < 0 else returncode


def worst_exit_code(returncodes) -> int:
  """The worst of several processes' statuses (0 if all succeeded).

  Example:
    >>> worst_exit_code([0, 0]), worst_exit_code([0, 2]), worst_exit_code([1, -9])
    (0, 2, 137)
  """
  return max((exit_status(r) for r in returncodes), default=0)


def describe(index: int, returncode: int) -> str:
  """``process 1 was killed by SIGKILL`` / ``process 0 exited with status 2``."""
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"process {index} was killed by {name}"
  return f"process {index} exited with status {returncode}"


def pump(stream, out, prefix: bytes, lock: threading.Lock) -> None:
  """Copy ``stream``'s lines to ``out`` (a binary file), each after ``prefix``."""
  for line in iter(stream.readline, b""):
    if not line.endswith(b"\n"):
      line += b"\n"
    with lock:
      out.write(prefix + line)
      out.flush()
  stream.close()


def stop(procs, grace: float, sig=signal.SIGTERM) -> None:
  """Send ``sig`` (if not None) to the processes still running; SIGKILL those left after
  ``grace`` seconds."""
  for p in procs:
    if sig is not None and p.poll() is None:
      p.send_signal(sig)
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def run(args, environ=os.environ, stdout=None, stderr=None, poll_s: float = 0.05) -> int:
  """Start the processes, pass on their output and signals, and return the job's status."""
  stdout = stdout or sys.stdout.buffer
  stderr = stderr or sys.stderr.buffer
  address = f"127.0.0.1:{free_port()}"
  argv = command_line(args.command)
  lock = threading.Lock()
  procs, pumps = [], []
  signalled = []
  previous = {}

  def forward(signum, frame):
    signalled.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  if threading.current_thread() is threading.main_thread():
    for s in (signal.SIGINT, signal.SIGTERM):
      previous[s] = signal.signal(s, forward)
  try:
    for i in range(args.nproc):
      env = child_env(environ, address, args.nproc, i, args.devices_per_proc)
      # a session of its own: a terminal's Ctrl-C reaches the launcher only, which passes it on
      p = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
      )
      procs.append(p)
      prefix = f"[p{i}] ".encode()
      for stream, out in ((p.stdout, stdout), (p.stderr, stderr)):
        t = threading.Thread(target=pump, args=(stream, out, prefix, lock), daemon=True)
        t.start()
        pumps.append(t)
    failed = None
    while failed is None and not signalled and any(p.poll() is None for p in procs):
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      if failed is None:
        time.sleep(poll_s)
    if signalled:  # every process has the signal: its own time to stop, then SIGKILL
      failed = None
      stop(procs, args.grace, sig=None)
    elif failed is None:  # all ended: the first non-zero one, if any
      failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
      running = [p for p in procs if p.poll() is None]
      why = describe(failed, procs[failed].returncode) + (
        "; stopping the others" if running else ""
      )
      with lock:
        stderr.write(f"{PROG}: {why}\n".encode())
        stderr.flush()
      stop(running, args.grace)
  except BaseException:
    stop(procs, args.grace)
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for t in pumps:
      t.join(timeout=5)
  if failed is not None:
    return exit_status(procs[failed].returncode)
  return worst_exit_code(p.returncode for p in procs)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
