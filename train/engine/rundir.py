"""One writer per output directory: a lock file naming the run that holds it.

A training script claims ``--output_dir`` before it writes anything there. The claim is the
file ``OUTPUT_DIR/run.lock`` (JSON: process id, host, the process's start time, the command),
created whole or not at all (written beside it, then hard-linked into place, which fails if the
file exists). A second run on the directory fails at once, naming the holder, and touches
nothing. A lock whose process is gone (same host, no such process, or the process id reused by
a later process) is stale: the next run takes it over, with a warning. A lock from another host
cannot be checked from here: it blocks until someone deletes it.

Example:
  >>> import tempfile
  >>> folder = tempfile.mkdtemp()
  >>> with claim(folder):
  ...   try:
  ...     claim(folder).__enter__()
  ...   except DirectoryInUse as e:
  ...     print(str(e).split(" (")[0])
  --output_dir ... is in use by another run
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import socket
import sys
import time

logger = logging.getLogger(__name__)

LOCK = "run.lock"


class DirectoryInUse(ValueError):
  """Another live run holds the output directory."""


def _start_ticks(pid: int) -> int | None:
  """When process ``pid`` started (clock ticks since boot, Linux), or None if unknown."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name may hold spaces


def _alive(holder: dict) -> bool:
  """Whether the process a lock names (on this host) still runs."""
  pid = holder.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: it exists
    pass
  started = holder.get("start_ticks")
  return started is None or _start_ticks(pid) in (None, started)


def _describe(holder: dict) -> str:
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("time", 0)))
  return f"pid {holder.get('pid')} on host {holder.get('host')!r}, since {when}"


def _read(lock: pathlib.Path) -> dict | None:
  try:
    holder = json.loads(lock.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _prepare(out: pathlib.Path) -> None:
  if out.exists() and not out.is_dir():
    raise ValueError(f"--output_dir {str(out)!r} is a file, not a folder: name a folder")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--output_dir {str(out)!r} cannot be created: {e.strerror}") from None


@contextlib.contextmanager
def claim(output_dir):
  """Holds ``output_dir`` (created if needed) for this process until the block ends.

  Raises:
    DirectoryInUse: another live run holds it; the message names that run.
    ValueError: ``output_dir`` is a file, or cannot be created.
  """
  out = pathlib.Path(output_dir)
  _prepare(out)
  lock = out / LOCK
  me = {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "start_ticks": _start_ticks(os.getpid()),
    "time": time.time(),
    "command": " ".join(sys.argv),
  }
  tmp = out / f".{LOCK}.{os.getpid()}.tmp"
  tmp.write_text(json.dumps(me))
  try:
    while True:
      try:
        os.link(tmp, lock)
        break
      except FileExistsError:
        pass
      holder = _read(lock)
      if holder is None:  # released meanwhile
        continue
      if holder and (holder.get("host") != me["host"] or _alive(holder)):
        raise DirectoryInUse(
          f"--output_dir {str(out)!r} is in use by another run ({_describe(holder)}): wait "
          f"for it to end or choose another --output_dir (if that run is gone, delete {lock})"
        )
      logger.warning("taking over the stale lock %s of a run that ended (%s)", lock,
                     _describe(holder) if holder else "unreadable")  # fmt: skip
      with contextlib.suppress(FileNotFoundError):  # another starting run may take it first
        os.rename(lock, out / f".{LOCK}.stale.{os.getpid()}")
        (out / f".{LOCK}.stale.{os.getpid()}").unlink()
  finally:
    tmp.unlink(missing_ok=True)
  try:
    yield out
  finally:
    if _read(lock) == me:
      lock.unlink(missing_ok=True)
