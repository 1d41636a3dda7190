"""Orbax checkpoints of a run's trainable state, checked against the run before they are used.

Each checkpoint holds two items: ``state`` (trainable leaves, optimizer state, step = data
position, rng; never the frozen base) and ``meta`` (JSON: the run's ``signature``, e.g. model
and LoRA settings, every leaf's shape, and a CRC-32 of every array). Restoring compares both
with the current run and refuses, listing every difference, when they disagree.

A checkpoint is checked before it is used: one that cannot be read, whose arrays do not match
their CRC-32, or that holds NaN or inf is damaged. :meth:`Checkpointer.restore_latest` names
each damaged one in a warning, moves it aside (``checkpoints/damaged/STEP``) and resumes from the
newest intact one; if none is intact it raises :class:`NoIntactCheckpoint`, naming the folder to
delete.

A checkpoint that cannot be written (a full disk, a quota) raises :class:`CheckpointWriteFailed`
in one line naming it and the reason; its partial folder is removed, the ones before it stay.
Orbax's background threads log each failed write with its traceback (hundreds of lines for one
full disk): :func:`orbax_errors_held` keeps those records back, and drops them when the failure
they describe is raised.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import traceback
import zlib
from typing import Any

import jax
import numpy as np

from train.engine.errors import first_line
from train.engine.state import TrainState

logger = logging.getLogger(__name__)
DAMAGED = "damaged"


class CheckpointMismatch(ValueError):
  """A checkpoint written for another model, task or LoRA shape."""


class NoIntactCheckpoint(ValueError):
  """Checkpoints exist but every one is damaged."""


class DamagedCheckpoint(Exception):
  """A checkpoint whose arrays are not what was saved."""


class CheckpointWriteFailed(OSError):
  """A checkpoint that could not be written (a full disk, a quota, a read-only folder)."""


TMP = ".orbax-checkpoint-tmp"  # Orbax writes checkpoint STEP as STEP.orbax-checkpoint-tmp*


def _is_write_error(e: BaseException) -> bool:
  """Whether ``e`` is a failed file write: the OS's, or TensorStore's (which names its code)."""
  return isinstance(e, OSError) or "os_error_code=" in str(e)


def _write_error(e: BaseException) -> str:
  """The reason of a failed Orbax write in a few words: the OS's (``File too large``, ``No
  space left on device``) when TensorStore gives its code, else the first line of ``e``."""
  code = re.search(r"os_error_code='?(\d+)", str(e))
  if code:
    return os.strerror(int(code.group(1)))
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  return first_line(e).split(" [")[0][:200]


def _leaf_paths(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(kp, simple=True, separator="/"): leaf for kp, leaf in flat}


def _describe(x) -> str:
  """``"float32[32, 4]"``."""
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  return f"{dtype}{list(np.shape(x))}"


def _encode(state: TrainState) -> dict:
  """A checkpointable dict of numpy arrays: Orbax sees no None leaves nor LoraSpec nodes."""
  trainable = _leaf_paths(state.trainable)
  return {
    "step": np.asarray(state.step),
    "rng": np.asarray(state.rng),
    "trainable": {p.replace("/", "."): np.asarray(v) for p, v in trainable.items()},
    "opt_state": {
      f"{i:05d}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(state.opt_state))
    },
  }


def _checksums(encoded: dict) -> dict[str, int]:
  """CRC-32 of every array of an :func:`_encode`d state, by ``"group/key"``."""
  flat = jax.tree_util.tree_flatten_with_path(encoded)[0]
  return {
    jax.tree_util.keystr(kp, simple=True, separator="/"): zlib.crc32(np.ascontiguousarray(v))
    for kp, v in flat
  }


def _layout(state: TrainState) -> dict:
  return {
    "trainable": {p: _describe(v) for p, v in _leaf_paths(state.trainable).items()},
    "opt_state": [_describe(v) for v in jax.tree.leaves(state.opt_state)],
  }


class Checkpointer:
  """Orbax ``CheckpointManager`` for the trainable state under ``directory`` (see the module)."""

  def __init__(self, directory, signature: dict, max_to_keep: int | None = None):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = pathlib.Path(directory).absolute()
    self.signature = signature
    self._writing: int | None = None  # the step being written in the background
    self._failed = False  # a write failed (CheckpointWriteFailed was raised)
    self.manager = ocp.CheckpointManager(
      self.directory,
      item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, extra: dict | None = None) -> None:
    """Saves host ``state`` (numpy) as checkpoint ``step`` (the optimizer step)."""
    ocp = self._ocp
    encoded = _encode(state)
    meta = {
      "signature": self.signature,
      "layout": _layout(state),
      "crc32": _checksums(encoded),
      **(extra or {}),
    }
    args = ocp.args.Composite(state=ocp.args.StandardSave(encoded), meta=ocp.args.JsonSave(meta))
    self._guarded(lambda: self.manager.save(step, args=args), step)
    self._writing = step

  def wait(self) -> None:
    """Waits for the checkpoint being written.

    Raises:
      CheckpointWriteFailed: it could not be written (see the module).
    """
    if not self._failed:  # else nothing is being written: the failure was raised already
      self._guarded(self.manager.wait_until_finished, self._writing)
    self._writing = None

  def _guarded(self, call, step: int | None) -> None:
    """``call()``; a failed write (its own, or the previous step's that it waits for) becomes
    :class:`CheckpointWriteFailed`, raised once the failure's objects are let go (outside the
    ``except``: its traceback holds Orbax's failed tasks, which log when they are freed). Other
    errors pass as they are."""
    try:
      call()
      return
    except Exception as e:  # Orbax re-raises its threads' errors as they were
      if not _is_write_error(e):
        raise
      failed, why = self._writing if self._writing is not None else step, _write_error(e)
    self._writing, self._failed = None, True
    self._remove_partials()
    self.manager.reload()  # it dropped the steps that the failed save was to replace, not their
    kept = sorted(self.manager.all_steps())  # folders: those are removed after a save succeeds
    raise CheckpointWriteFailed(
      f"could not write checkpoint {failed} in {self.directory} ({why}): is the disk full? "
      + (f"checkpoint {kept[-1]} is intact: free space, then rerun the same command to resume"
         if kept else "no checkpoint was kept: free space, then rerun the same command")
    )  # fmt: skip

  def _remove_partials(self, quiet_s: float = 0.5, limit_s: float = 30.0) -> None:
    """Removes the failed save's folders (``STEP.orbax-checkpoint-tmp*``) until none has come back
    for ``quiet_s``. Orbax raises the first failed write while the others go on in TensorStore's
    threads, and those still create files in the folder after it was first removed (seen in CI:
    ``4.orbax-checkpoint-tmp`` left beside checkpoint 2). No new save starts once one failed."""
    start = last_seen = time.monotonic()
    while time.monotonic() - last_seen < quiet_s and time.monotonic() - start < limit_s:
      partials = list(self.directory.glob(f"*{TMP}*"))
      for partial in partials:
        shutil.rmtree(partial, ignore_errors=True)
      if partials:
        last_seen = time.monotonic()
      time.sleep(0.05)

  def check(self, step: int, template: TrainState) -> dict:
    """The checkpoint's meta, after checking it fits ``template``; else CheckpointMismatch."""
    ocp = self._ocp
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    problems = []
    theirs = meta.get("signature", {})
    for key in sorted(set(theirs) | set(self.signature)):
      if theirs.get(key) != self.signature.get(key):
        problems.append(
          f"{key}: checkpoint {theirs.get(key)!r}, this run {self.signature.get(key)!r}"
        )
    mine, saved = _layout(template), meta.get("layout", {})
    for path in sorted(set(mine["trainable"]) | set(saved.get("trainable", {}))):
      a, b = saved.get("trainable", {}).get(path), mine["trainable"].get(path)
      if a != b:
        problems.append(f"{path}: checkpoint {a or 'missing'}, this run {b or 'missing'}")
    if not problems and saved.get("opt_state") != mine["opt_state"]:
      problems.append("optimizer state: a different structure (e.g. gradient accumulation)")
    if problems:
      raise CheckpointMismatch(
        f"checkpoint {self.directory / str(step)} was written by a different setup; refusing "
        f"to resume from it ({len(problems)} difference(s): " + "; ".join(problems) + "); use "
        "another --output_dir, or delete its checkpoints/ to start over"
      )
    return meta

  def restore(self, step: int, template: TrainState) -> tuple[TrainState, dict]:
    """Checkpoint ``step`` as a host ``TrainState`` shaped like ``template``, and its meta."""
    ocp = self._ocp
    meta = self.check(step, template)
    target = _encode(template)
    got = self.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )["state"]
    _verify(got, meta, self.directory / str(step))
    by_path = {p.replace(".", "/"): v for p, v in got["trainable"].items()}
    flat, treedef = jax.tree_util.tree_flatten_with_path(template.trainable)
    trainable = jax.tree_util.tree_unflatten(
      treedef, [by_path[jax.tree_util.keystr(kp, simple=True, separator="/")] for kp, _ in flat]
    )
    opt_leaves = [got["opt_state"][k] for k in sorted(got["opt_state"])]
    opt_state = jax.tree.unflatten(jax.tree.structure(template.opt_state), opt_leaves)
    state = TrainState(
      step=np.asarray(got["step"]), trainable=trainable, opt_state=opt_state, rng=got["rng"]
    )
    return state, meta

  def restore_latest(self, template: TrainState) -> tuple[int, TrainState, dict] | None:
    """``(step, state, meta)`` of the newest intact checkpoint, or None if there is none.

    Damaged ones (see the module) are named in a warning and moved to ``damaged/``; a
    checkpoint of another setup is refused (:class:`CheckpointMismatch`), never skipped.

    Raises:
      NoIntactCheckpoint: checkpoints exist, and all are damaged.
    """
    with quiet_closed_event_loops():  # a failed read leaves Orbax's callbacks behind
      return self._restore_latest(template)

  def _restore_latest(self, template: TrainState) -> tuple[int, TrainState, dict] | None:
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      path = self.directory / str(step)
      try:
        state, meta = self.restore(step, template)
      except CheckpointMismatch:
        raise
      except Exception as e:  # unreadable files, bad JSON, wrong bytes: all mean damaged
        # The first line, without tensorstore's " [source locations=...]" tail.
        why = first_line(e).split(" [")[0][:300]
        logger.warning("checkpoint %s is damaged (%s); trying an older one", path, why)
        damaged.append(self._set_aside(step))
        continue
      if damaged:
        logger.warning("resuming from %s; damaged checkpoints moved to %s", path, damaged)
      return step, state, meta
    if damaged:
      raise NoIntactCheckpoint(
        f"no intact checkpoint in {self.directory} (damaged ones moved to "
        f"{self.directory / DAMAGED}): delete {self.directory} to start the run over"
      )
    return None

  def _set_aside(self, step: int) -> pathlib.Path:
    """Moves checkpoint ``step`` to ``damaged/STEP`` (out of the manager's sight)."""
    target = self.directory / DAMAGED / str(step)
    if target.exists():
      shutil.rmtree(target)
    target.parent.mkdir(exist_ok=True)
    (self.directory / str(step)).rename(target)
    self.manager.reload()
    return target


def _verify(got: dict, meta: dict, path: pathlib.Path) -> None:
  """Raises :class:`DamagedCheckpoint` if restored arrays differ from their saved CRC-32 or
  are not finite (checkpoints written before CRCs were kept are checked for finiteness only)."""
  expected = meta.get("crc32")
  actual = _checksums(got) if expected is not None else None
  if actual != expected:
    bad = sorted(k for k, v in actual.items() if expected.get(k) != v)
    names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")  # no ' [': it ends `why`
    raise DamagedCheckpoint(f"{path}: {len(bad)} array(s) fail their CRC-32 check: {names}")
  for key, value in jax.tree_util.tree_flatten_with_path(got)[0]:
    if np.issubdtype(np.asarray(value).dtype, np.floating) and not np.isfinite(value).all():
      name = jax.tree_util.keystr(key, simple=True, separator="/")
      raise DamagedCheckpoint(f"{path}: {name} holds NaN or inf")


def _from_orbax(record: logging.LogRecord) -> bool:
  """An error record about Orbax's background work: absl's from Orbax's code (or with a
  traceback through it), or asyncio's "Task exception was never retrieved" for Orbax's tasks."""
  inside = f"{os.sep}orbax{os.sep}"
  if record.levelno < logging.ERROR:
    return False
  if record.name == "asyncio":
    return inside in record.getMessage()
  if record.name != "absl":
    return False
  # absl.logging.exception's records name absl's own file: look at the traceback too
  frames = traceback.extract_tb(record.exc_info[2]) if record.exc_info else []
  return inside in record.pathname or any(inside in f.filename for f in frames)


class _Held(logging.Filter):
  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []

  def filter(self, record: logging.LogRecord) -> bool:
    if _from_orbax(record):
      self.records.append(record)
      return False
    return True


@contextlib.contextmanager
def orbax_errors_held():
  """Within the block, Orbax's error records (from its background threads, each with a
  traceback) are held back. If the block ends in :class:`CheckpointWriteFailed`, which says in
  one line what they say in hundreds, they are dropped (logged at debug level, counted); else
  they are logged as they came, when the block ends.

  Example:
    >>> with orbax_errors_held():
    ...   logging.getLogger("absl").filters[-1].__class__.__name__
    '_Held'
  """
  held = _Held()
  loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
  for each in loggers:
    each.addFilter(held)
  failed = False
  try:
    yield
  except CheckpointWriteFailed:
    failed = True
    raise
  finally:
    gc.collect()  # Orbax's failed tasks log when freed: while the filter holds
    for each in loggers:
      each.removeFilter(held)
    if failed:
      logger.debug("dropped %d Orbax error record(s) of the failed write", len(held.records))
    else:
      for record in held.records:
        logging.getLogger(record.name).handle(record)


@contextlib.contextmanager
def quiet_closed_event_loops():
  """Within the block, Orbax's "Event loop is closed" is kept from stderr; the previous
  ``sys.unraisablehook`` is back when the block ends.

  When Orbax fails to read a damaged checkpoint or adapter, its pending asyncio callbacks later
  find their event loop closed; Python prints each as "Exception ignored in: ..." with a
  traceback, beside the one-line error or warning that already says what happened. Every other
  unraisable exception still reaches the previous hook. Garbage is collected before the block
  ends, so what Orbax left behind is reported while the block's hook holds.

  Example:
    >>> before = sys.unraisablehook
    >>> with quiet_closed_event_loops():
    ...   sys.unraisablehook is before
    False
    >>> sys.unraisablehook is before
    True
  """
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
      "Event loop is closed"
    ):
      logger.debug("dropped an unraisable 'Event loop is closed' (Orbax after a failed read)")
      return
    previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    if sys.unraisablehook is hook:  # else someone replaced it since: leave theirs
      sys.unraisablehook = previous
