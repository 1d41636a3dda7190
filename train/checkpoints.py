"""Orbax checkpoints of a run's trainable state, checked against the run before they are used.

Each checkpoint holds two items: ``state`` (trainable leaves, optimizer state, step = data
position, rng; never the frozen base) and ``meta`` (JSON: the run's ``signature``, e.g. model
and LoRA settings, and every leaf's shape). Restoring compares both with the current run and
refuses, listing every difference, when they disagree.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np

from train.trainer import TrainState


class CheckpointMismatch(ValueError):
  """A checkpoint written for another model, task or LoRA shape."""


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
    meta = {"signature": self.signature, "layout": _layout(state), **(extra or {})}
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(_encode(state)), meta=ocp.args.JsonSave(meta)
      ),
    )

  def wait(self) -> None:
    self.manager.wait_until_finished()

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
        f"to resume from it ({len(problems)} difference(s)):\n  "
        + "\n  ".join(problems)
        + "\nUse another --output_dir, or delete its checkpoints/ to start over."
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
