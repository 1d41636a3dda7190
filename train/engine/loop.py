"""The training loop: optimizer steps, with what happens around them handed to hooks.

:func:`fit` runs the compiled steps of a :class:`train.engine.parallel.Parallel` over a stream of
batches, checks every step's loss and gradient norm, and calls its :class:`Hook` objects: a row
of metrics to log, an evaluation or a save due, a step done. :func:`train.engine.run.run` builds
the hooks of a whole run (metrics log, evaluation, checkpoints).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from train.engine.parallel import Parallel

logger = logging.getLogger(__name__)


class Diverged(ValueError):
  """The training loss or gradient norm went NaN or inf."""


def check_finite_step(step: int, metrics: list[dict], schedule: Callable[[int], Any]) -> None:
  """Raises :class:`Diverged` if a micro-batch of optimizer step ``step`` has a non-finite
  ``loss`` or ``grad_norm`` (waits for the step to finish).

  Example:
    >>> check_finite_step(3, [{"loss": 0.5, "grad_norm": 1.0}], lambda i: 1e-3)
    >>> check_finite_step(4, [{"loss": float("nan"), "grad_norm": 1.0}], lambda i: 1e-3)
    Traceback (most recent call last):
    ...
    train.engine.loop.Diverged: the training loss is nan at step 4 (learning rate 0.001): ...
  """
  for m in metrics:
    for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
      value = float(m[key])
      if not math.isfinite(value):
        raise Diverged(
          f"the {what} is {value} at step {step} (learning rate {float(schedule(step - 1)):.3g}):"
          " the training diverged; lower --learning_rate or set --max_grad_norm and start "
          "again in a new --output_dir. Nothing from this step on was saved; the checkpoints "
          "before it are kept"
        )


@dataclasses.dataclass
class LoopConfig:
  """When the loop logs, evaluates and saves (in optimizer steps; 0 = only at the end)."""

  total_steps: int
  accumulation: int = 1
  logging_steps: int = 10
  eval_steps: int = 0
  save_steps: int = 0
  progress: bool = True


class Hook:
  """What :func:`fit` calls around its steps; a hook overrides the callbacks it needs (each one
  here does nothing).

  Example:
    >>> class Losses(Hook):
    ...   def __init__(self):
    ...     self.rows = []
    ...
    ...   def on_log(self, row):
    ...     self.rows.append(row["loss"])
  """

  def on_log(self, row: dict) -> None:
    """One row of training metrics (``step``, ``loss``, ``grad_norm``, ``learning_rate``,
    ``examples_per_s``, ``tokens_per_s``, ``s_per_step``), every ``logging_steps`` and at the
    end."""

  def on_evaluate(self, step: int, state) -> None:
    """Every ``eval_steps`` (the caller evaluates at the end itself); its time is left out of
    the logged throughputs."""

  def on_save(self, step: int, state) -> None:
    """Every ``save_steps`` and at the end."""

  def after_step(self, step: int) -> None:
    """After each optimizer step (tests simulate a crash with it, the benchmark takes turns
    with another process); its time is left out of the logged throughputs."""


class StepCallback(Hook):
  """A hook that calls ``fn(step)`` after each optimizer step (:meth:`Hook.after_step`)."""

  def __init__(self, fn: Callable[[int], None]):
    self.fn = fn

  def after_step(self, step: int) -> None:
    self.fn(step)


def fit(
  parallel: Parallel,
  state,
  frozen,
  batches: Iterator[dict],
  config: LoopConfig,
  hooks: Sequence[Hook] = (),
  *,
  schedule: Callable[[int], Any],
  counts: Callable[[dict], tuple[int, int]],
):
  """Runs optimizer steps from the one ``state`` is at up to ``config.total_steps``.

  Args:
    parallel: the mode's placement and steps.
    state: placed :class:`train.engine.state.TrainState`.
    frozen: placed frozen partition.
    batches: global numpy micro-batches, starting at ``state.step`` (the data position).
    config: totals and intervals.
    hooks: called in order at each event (:class:`Hook`).
    schedule: learning rate by optimizer step (for the logs).
    counts: ``counts(batch) -> (examples, tokens)`` of a micro-batch, for the throughputs.

  Returns:
    The final state.

  Raises:
    Diverged: a step's loss or gradient norm is not finite. Each step is checked once the next
      one is queued (so the device never waits for the host), and before anything is logged,
      evaluated or saved: nothing from the diverged step on reaches a file.
  """
  from tqdm.auto import tqdm

  k = config.accumulation
  start = int(parallel.host(state.step)) // k
  bar = tqdm(
    total=config.total_steps,
    initial=start,
    disable=not config.progress or jax.process_index() != 0,
    desc="train",
    dynamic_ncols=True,
  )
  window, examples, tokens, t0 = [], 0, 0, time.perf_counter()
  previous = None  # the last step's (step, metrics), checked once this step is queued
  for step in range(start + 1, config.total_steps + 1):
    micro = []
    for _ in range(k):
      batch = next(batches)
      n_examples, n_tokens = counts(batch)
      examples, tokens = examples + n_examples, tokens + n_tokens
      state, metrics = parallel.train(state, frozen, parallel.put_batch(batch))
      micro.append(metrics)
    window += micro
    if previous is not None:
      check_finite_step(*previous, schedule)
    previous = (step, micro)
    bar.update(1)
    last = step == config.total_steps
    logs = step % config.logging_steps == 0 or last
    evaluates = bool(config.eval_steps) and step % config.eval_steps == 0
    saves = bool(config.save_steps and step % config.save_steps == 0) or last
    if logs or evaluates or saves:
      check_finite_step(step, micro, schedule)
      previous = None  # checked already
    if logs:
      means = {key: float(np.mean([float(m[key]) for m in window])) for key in window[0]}
      dt = time.perf_counter() - t0  # the float() above waited for the steps to finish
      row = {
        "step": step,
        "loss": means["loss"],
        "grad_norm": means["grad_norm"],
        "learning_rate": float(schedule(step - 1)),
        "examples_per_s": round(examples / dt, 2),
        "tokens_per_s": round(tokens / dt, 1),
        "s_per_step": round(dt * k / max(len(window), 1), 4),
      }
      for hook in hooks:
        hook.on_log(row)
      bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.1f}")
      window, examples, tokens, t0 = [], 0, 0, time.perf_counter()
    if evaluates:
      for hook in hooks:
        hook.on_evaluate(step, state)
      t0 = time.perf_counter()  # evaluation time is not training throughput
    if saves:
      for hook in hooks:
        hook.on_save(step, state)
    began = time.perf_counter()
    for hook in hooks:
      hook.after_step(step)
    t0 += time.perf_counter() - began  # the hooks' time is not training throughput either
  bar.close()
  return state
