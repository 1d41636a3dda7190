"""A whole run, the same for every script.

:func:`run` takes the parameters (adapters in), the task (:class:`Task`: its loss, batches,
evaluation) and the run's :class:`Settings`, and does the rest: optimizer and schedule,
parallel mode, the bf16 frozen base, Orbax checkpoints of the trainable state (resuming from
the newest one that fits this run), the metrics log, periodic evaluation and saving (hooks of
:func:`train.engine.loop.fit`), and the final evaluation. ``train/run_glue.py`` and
``train/run_clm.py`` differ only in their tasks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import Protocol

import jax
import numpy as np

import lora_jax
from train.engine import checkpoints
from train.engine import loop
from train.engine import outputs
from train.engine import parallel as parallel_lib
from train.engine import state as state_lib
from train.engine import step as step_lib
from train.engine.loop import Diverged
from train.engine.parallel import AXIS
from train.engine.parallel import Parallel

logger = logging.getLogger(__name__)


class Task(Protocol):
  """What a script supplies: its loss, batches and evaluation (GLUE's, causal LM's, ...)."""

  def loss(self, trainable, frozen, batch: dict, rngs: dict) -> tuple[jax.Array, jax.Array]:
    """``(total, weight)``: the summed weighted loss of a global batch and the summed weight."""

  def eval_step(self, trainable, frozen, batch: dict):
    """Per-row outputs that :meth:`evaluate` turns into metrics (jitted by the loop)."""

  def batches(self, start: int, data_parallel: int) -> Iterator[dict]:
    """Global numpy micro-batches from micro-batch ``start`` on (the data position)."""

  def counts(self, batch: dict) -> tuple[int, int]:
    """``(examples, tokens)`` in a micro-batch."""

  def evaluate(self, step: int, parallel: Parallel, trainable, frozen) -> dict:
    """``eval_*`` metrics at ``step`` (``{}`` when there is nothing to evaluate)."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to train, as every script's flags say it (names are the flags')."""

  output_dir: str
  total_steps: int
  learning_rate: float
  lr_scheduler_type: str = "linear"
  warmup_ratio: float = 0.0
  weight_decay: float = 0.0
  max_grad_norm: float | None = None
  gradient_accumulation_steps: int = 1
  logging_steps: int = 10
  eval_steps: int = 0
  save_steps: int = 0
  save_total_limit: int = 0
  parallel: str = "none"
  shard_frozen: bool = False
  seed: int = 0
  dtype: str = "float32"
  progress: bool = True
  eval_on_start: bool = False  # a fresh run also evaluates before its first step
  loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate / A's


# The flags of train.cli.flags.TrainingConfig that Settings takes under the same names.
SHARED_FLAGS = (
  "output_dir", "learning_rate", "warmup_ratio", "weight_decay", "gradient_accumulation_steps",
  "logging_steps", "eval_steps", "save_steps", "save_total_limit", "parallel", "shard_frozen",
  "seed", "dtype", "progress", "loraplus_lr_ratio",
)  # fmt: skip


def settings_from_flags(args, total_steps: int, **fields) -> Settings:
  """:class:`Settings` from a script's parsed flags (:data:`SHARED_FLAGS`), plus ``fields``
  (the script's own: its schedule, clipping, ...)."""
  shared = {name: getattr(args, name) for name in SHARED_FLAGS}
  return Settings(total_steps=total_steps, **shared, **fields)


@dataclasses.dataclass
class Trained:
  """What :func:`run` leaves: final metrics, and the state to predict with or export.

  Attributes:
    results: ``step``, ``train_steps``, ``train_runtime_s`` and the final ``eval_*``.
    finished_before: ``OUTPUT_DIR`` held this run finished (its final checkpoint and
      ``eval_results.json``); ``results`` are that file's, the other fields None.
    parallel: the mode's placement and compiled steps.
    trainable: the placed trained partition.
    frozen: the placed frozen partition (in the compute dtype).
    params: the trained tree on the host side for exports: trained leaves combined with the
      frozen base as loaded (float32).
  """

  results: dict
  parallel: Parallel | None
  trainable: Any
  frozen: Any
  params: Any
  finished_before: bool = False  # the run had already finished: nothing was trained or written


def total_steps(rows: int, global_batch: int, accumulation: int, epochs: float, max_steps: int):
  """Optimizer steps of a run: ``max_steps`` if given, else ``epochs`` over ``rows``.

  Raises:
    ValueError: fewer rows than one optimizer step takes.
  """
  per_epoch = (rows // global_batch) // accumulation
  if per_epoch == 0 and not max_steps:
    raise ValueError(
      f"the training set has {rows} rows, fewer than one optimizer step of {global_batch} x "
      f"{accumulation} (global batch x gradient_accumulation_steps)"
    )
  return max_steps or max(1, math.ceil(epochs * per_epoch))


def training_signature(settings: Settings) -> dict:
  """The settings a resumed run must share with the checkpoint (with the task's signature): each
  one that shapes the updates, under its flag's name, so a refusal names it with both values.
  ``total_steps`` is there because the learning-rate schedule is laid out over it."""
  fields = ("total_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay",
            "max_grad_norm", "gradient_accumulation_steps", "seed", "dtype",
            "loraplus_lr_ratio")  # fmt: skip
  return {f: getattr(settings, f) for f in fields}


def _finished_results(out: pathlib.Path, latest: int | None, total: int) -> dict | None:
  """The final results of a run in ``out`` that already reached step ``total``, else None."""
  path = out / outputs.EVAL_RESULTS
  if latest != total or not path.exists():
    return None
  try:
    results = json.loads(path.read_text())
  except (OSError, ValueError):
    return None  # never finished writing: finish again
  return results if isinstance(results, dict) and results.get("step") == total else None


def _check_results(results: dict, step: int) -> None:
  bad = {k: v for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)}
  if bad:
    raise Diverged(
      f"the evaluation at step {step} gave non-finite {bad}: the trained adapter is not "
      "usable; nothing was exported and eval_results.json was not written"
    )


class _RunHooks(loop.Hook):
  """A run's hooks: the metrics log, evaluations (timed, kept by step), checkpoints, and the
  caller's ``on_step`` (timed: neither is training time)."""

  def __init__(self, task, parallel, frozen, log, ckpt, on_step):
    self.task, self.parallel, self.frozen = task, parallel, frozen
    self.log, self.ckpt, self.on_step = log, ckpt, on_step
    self.evaluated: dict[int, dict] = {}
    self.eval_seconds: list[float] = []
    self.step_seconds: list[float] = []

  def on_log(self, row: dict) -> None:
    self.log.write(row)

  def on_evaluate(self, step: int, state) -> None:
    t0 = time.perf_counter()
    results = self.task.evaluate(step, self.parallel, state.trainable, self.frozen)
    self.eval_seconds.append(time.perf_counter() - t0)
    if results:
      self.log.write({"step": step, **results})
      logger.info("evaluation at step %d: %s", step, outputs.format_metrics(results))
    self.evaluated[step] = results

  def on_save(self, step: int, state) -> None:
    host = self.parallel.host(state)
    self.ckpt.save(step, host, {"optimizer_step": step, "data_position": int(host.step)})

  def after_step(self, step: int) -> None:
    if self.on_step is not None:
      t0 = time.perf_counter()
      self.on_step(step)
      self.step_seconds.append(time.perf_counter() - t0)


@dataclasses.dataclass
class Plan:
  """A run as a script sets it up (``plan(args)`` of each task's pipeline), before anything is
  trained or written: what :func:`run` runs and :mod:`train.engine.lowering` lowers.

  Attributes:
    params: the parameter tree, adapters in.
    task: the script's :class:`Task`.
    settings: how to train.
    signature: the task's settings a resumed run must share with its checkpoint.
    record: the flags, written to ``args.json``.
    extra_trainable: leaves trained whole beside the adapters (a classifier head).
    finish: called with the :class:`Trained` run: the script's predictions and exports.
  """

  params: Any
  task: Task
  settings: Settings
  signature: dict
  record: dict | None = None
  extra_trainable: Any = ()
  finish: Callable[[Trained], None] | None = None


@dataclasses.dataclass
class Prepared:
  """What :func:`prepare` builds from a :class:`Plan`: the partitions, the optimizer and the
  parallel mode's compiled steps (nothing placed on a device yet)."""

  trainable: Any  # the trainable partition (float32)
  base: Any  # the frozen partition as loaded
  frozen: Any  # the frozen partition in the compute dtype
  schedule: Callable
  tx: Any  # optax.GradientTransformation
  parallel: Parallel

  def init_state(self, seed: int) -> state_lib.TrainState:
    return state_lib.init_state(self.trainable, self.tx, seed)


def prepare(plan: Plan) -> Prepared:
  """The partitions, optimizer, schedule and parallel mode of ``plan``: everything
  :func:`run` compiles, the same for every script."""
  settings = plan.settings
  mask = lora_jax.trainable_mask(plan.params, plan.extra_trainable)
  trainable, base = lora_jax.partition(plan.params, mask)
  total = settings.total_steps
  schedule = state_lib.make_schedule(
    settings.lr_scheduler_type,
    settings.learning_rate,
    total,
    math.ceil(settings.warmup_ratio * total),
  )
  tx = state_lib.make_optimizer(
    plan.params,
    schedule,
    weight_decay=settings.weight_decay,
    accumulation=settings.gradient_accumulation_steps,
    extra_trainable=plan.extra_trainable,
    max_grad_norm=settings.max_grad_norm,
    loraplus_lr_ratio=settings.loraplus_lr_ratio,
  )
  axis = AXIS if settings.parallel == "pmap" else None
  parallel = Parallel(
    settings.parallel,
    step_lib.make_train_step(plan.task.loss, tx, axis),
    plan.task.eval_step,
    shard_frozen=settings.shard_frozen,
  )
  frozen = state_lib.compute_dtype(base, settings.dtype)
  return Prepared(trainable, base, frozen, schedule, tx, parallel)


def run(plan: Plan, on_step: Callable[[int], None] | None = None) -> Trained:
  """Trains ``plan.params``' adapters (and ``plan.extra_trainable`` leaves) on ``plan.task``,
  or resumes; ``on_step(step)`` is called after each optimizer step.

  Writes ``args.json`` (``plan.record``: the flags), ``metrics.jsonl``, ``checkpoints/``, then
  calls ``plan.finish(trained)`` (the script's predictions and exports), and last
  ``eval_results.json`` and ``curves.png``, under ``settings.output_dir``. So a run is finished
  once ``eval_results.json`` is there: rerunning it trains nothing and writes nothing
  (``Trained.finished_before``).

  Resuming: the newest intact checkpoint is used (damaged ones are set aside, see
  :mod:`train.engine.checkpoints`). One from another ``plan.signature``, other training
  settings (:func:`training_signature`) or another trainable layout is refused
  (:class:`checkpoints.CheckpointMismatch`) before anything is written.

  Raises:
    Diverged: a non-finite training loss, gradient norm or final evaluation.
  """
  task, settings, record, finish = plan.task, plan.settings, plan.record, plan.finish
  out = pathlib.Path(settings.output_dir)
  main_process = jax.process_index() == 0
  prepared = prepare(plan)
  base, frozen = prepared.base, prepared.frozen
  schedule, parallel = prepared.schedule, prepared.parallel
  total, k = settings.total_steps, settings.gradient_accumulation_steps

  host_state = jax.tree.map(np.asarray, prepared.init_state(settings.seed))
  signature = {**plan.signature, **training_signature(settings)}
  ckpt = checkpoints.Checkpointer(
    out / "checkpoints", signature, max_to_keep=settings.save_total_limit
  )
  log = outputs.MetricsLog(out, enabled=main_process)
  restored = ckpt.restore_latest(host_state)
  latest = None if restored is None else restored[0]  # an optimizer step
  done = _finished_results(out, latest, total)
  if done is not None:
    logger.info(
      "the run in %s already finished (step %d of %d; eval_results.json): its results are left "
      "as they are; to train again, choose another --output_dir",
      out, total, total,
    )  # fmt: skip
    return Trained(done, None, None, None, None, finished_before=True)
  if restored is not None:
    host_state = restored[1]
    log.truncate_after(latest)
    logger.info("resuming from %s (step %d of %d)", ckpt.directory / str(latest), latest, total)
  else:
    log.truncate_after(0)
  if record is not None and main_process:
    outputs.write_json(out / "args.json", record)
  state = parallel.put_state(host_state)
  whole = sum(x.nbytes for x in jax.tree.leaves(frozen))
  frozen = parallel.put_frozen(frozen)
  here, devices = parallel_lib.held_here(frozen)
  logger.info(
    "frozen base: %.1f MB on this process's %d device(s), one copy %.1f MB%s",
    here / 1e6, devices, whole / 1e6, " (sharded: --shard_frozen)" if parallel.shard_frozen else "",
  )  # fmt: skip

  hooks = _RunHooks(task, parallel, frozen, log, ckpt, on_step)
  batches = task.batches(int(host_state.step), parallel.data_parallel)
  first_step = int(host_state.step) // k
  if settings.eval_on_start and first_step == 0:
    hooks.on_evaluate(0, state)
    hooks.eval_seconds.clear()  # before the loop's clock starts
  t0 = time.perf_counter()
  config = loop.LoopConfig(
    total, k, settings.logging_steps, settings.eval_steps, settings.save_steps, settings.progress
  )
  # A failed checkpoint write ends the run in one line (CheckpointWriteFailed), not with
  # Orbax's background tracebacks.
  with checkpoints.orbax_errors_held():
    try:
      state = loop.fit(
        parallel, state, frozen, batches, config, [hooks], schedule=schedule, counts=task.counts
      )
    finally:  # an interrupted run still finishes writing the checkpoints it started
      ckpt.wait()
  final_step = int(parallel.host(state.step)) // k
  # This process's training loop, compilation included, evaluations and on_step excluded (HF's
  # train_runtime).
  runtime = time.perf_counter() - t0 - sum(hooks.eval_seconds) - sum(hooks.step_seconds)
  results = {
    "step": final_step,
    "train_steps": final_step - first_step,
    "train_runtime_s": round(runtime, 3),
  }
  if final_step not in hooks.evaluated:
    hooks.on_evaluate(final_step, state)
  results.update(hooks.evaluated[final_step])
  _check_results(results, final_step)
  trained = Trained(
    results,
    parallel,
    state.trainable,
    frozen,
    lora_jax.combine(parallel.host(state.trainable), base),
  )
  if finish is not None:
    finish(trained)
  if main_process:  # last: eval_results.json marks the run finished
    outputs.plot_curves(out / outputs.METRICS, out / outputs.CURVES)
    outputs.write_json(out / outputs.EVAL_RESULTS, results)
  return trained
