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
import shutil
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


def _unwritable(out: pathlib.Path, e: OSError) -> ValueError:
  return ValueError(
    f"--output_dir {str(out)!r} is not writable ({e.strerror}): choose a folder you can write "
    "to, or change its permissions"
  )


@contextlib.contextmanager
def claim(output_dir):
  """Holds ``output_dir`` (created if needed) for this process until the block ends.

  Raises:
    DirectoryInUse: another live run holds it; the message names that run.
    ValueError: ``output_dir`` is a file, cannot be created, or is not writable.
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
  try:  # the first write there: before any work, a read-only folder ends the run in one line
    tmp.write_text(json.dumps(me))
  except OSError as e:
    raise _unwritable(out, e) from None
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


RECORD = "args.json"  # the flags of the run in the folder (train.engine.run.run writes it)
# Flags that change how a run reports, saves or is placed, not what it trains: a rerun may
# change them and still resume. Any other flag changed makes a rerun a different run.
NOT_SHAPING = frozenset({
  "config", "output_dir", "overwrite_output_dir", "progress", "logging_steps", "eval_steps",
  "save_steps", "save_total_limit", "per_device_eval_batch_size", "export_merged", "do_predict",
  "test_file", "max_predict_samples", "max_eval_samples", "eval_on_start",
  "generation_prompts_file", "generation_max_new_tokens", "parallel", "shard_frozen", "bf16",
  "fp16", "distributed_timeout",
})  # fmt: skip


def check_rerun(output_dir, record: dict, overwrite: bool) -> None:
  """A rerun into ``output_dir`` (held: :func:`claim`) with the flags ``record``.

  The same settings as the run there (its ``args.json``; flags in :data:`NOT_SHAPING` aside)
  resume it (or leave a finished run's results), as before. Other settings are another run:
  refused, naming each changed flag, unless ``overwrite`` (``--overwrite_output_dir``, as in
  transformers), which deletes the run there (everything in the folder but the lock) to start
  over.

  Example:
    >>> import tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (out / RECORD).write_text('{"learning_rate": 0.001, "progress": true}')
    >>> check_rerun(out, {"learning_rate": 0.001, "progress": False}, overwrite=False)
    >>> check_rerun(out, {"learning_rate": 0.01}, overwrite=False)
    Traceback (most recent call last):
    ...
    ValueError: --output_dir '...' holds a run with other settings (learning_rate: 0.001 there, ...
    >>> check_rerun(out, {"learning_rate": 0.01}, overwrite=True)
    >>> sorted(p.name for p in out.iterdir())
    []
  """
  out = pathlib.Path(output_dir)
  try:
    before = json.loads((out / RECORD).read_text())
  except FileNotFoundError:
    return
  except (OSError, ValueError):
    before = None  # unreadable: the checkpoints' own signature check still guards a resume
  if overwrite:
    if before is not None or (out / "checkpoints").exists():
      logger.warning("--overwrite_output_dir: deleting the run in %s to start over", out)
      for entry in out.iterdir():
        if entry.name == LOCK:
          continue
        if entry.is_dir() and not entry.is_symlink():
          shutil.rmtree(entry)
        else:
          entry.unlink()
    return
  if not isinstance(before, dict):
    return
  now = json.loads(json.dumps(record, default=str))
  changed = [
    f"{k}: {before[k]!r} there, {now[k]!r} now"
    for k in sorted(set(before) & set(now) - NOT_SHAPING)
    if before[k] != now[k]
  ]
  if changed:
    raise ValueError(
      f"--output_dir {str(out)!r} holds a run with other settings ({'; '.join(changed)}): pass "
      "--overwrite_output_dir to replace that run, rerun with its settings to resume it, or "
      "choose another --output_dir"
    )
