"""The training loop and everything around it, the same for every script.

:func:`run` takes the parameters (adapters in), the task (:class:`Task`: its loss, batches,
evaluation) and the run's :class:`Settings`, and does the rest: optimizer and schedule,
parallel mode, the bf16 frozen base, Orbax checkpoints of the trainable state (resuming from
the newest one that fits this run), the metrics log, periodic evaluation and saving, and the
final evaluation. ``train/run_glue.py`` and ``train/run_clm.py`` differ only in their tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from train import checkpoints
from train import outputs
from train import trainer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoopConfig:
  """When the loop logs, evaluates and saves (in optimizer steps; 0 = only at the end)."""

  total_steps: int
  accumulation: int = 1
  logging_steps: int = 10
  eval_steps: int = 0
  save_steps: int = 0
  progress: bool = True


def fit(
  parallel: trainer.Parallel,
  state,
  frozen,
  batches: Iterator[dict],
  config: LoopConfig,
  *,
  schedule: Callable[[int], Any],
  log: Callable[[dict], None],
  counts: Callable[[dict], tuple[int, int]],
  evaluate: Callable[[int, Any], dict] | None = None,
  save: Callable[[int, Any], None] | None = None,
  on_step: Callable[[int], None] | None = None,
):
  """Runs optimizer steps from the one ``state`` is at up to ``config.total_steps``.

  Args:
    parallel: the mode's placement and steps.
    state: placed :class:`trainer.TrainState`.
    frozen: placed frozen partition.
    batches: global numpy micro-batches, starting at ``state.step`` (the data position).
    config: totals and intervals.
    schedule: learning rate by optimizer step (for the logs).
    log: receives one dict per logged step (``step``, ``loss``, ``grad_norm``,
      ``learning_rate``, ``examples_per_s``, ``tokens_per_s``, ``s_per_step``).
    counts: ``counts(batch) -> (examples, tokens)`` of a micro-batch, for the throughputs.
    evaluate: ``evaluate(step, state)`` every ``eval_steps`` (the caller evaluates at the end).
    save: ``save(step, state)`` every ``save_steps`` and at the end.
    on_step: called after each optimizer step (tests use it to simulate a crash).

  Returns:
    The final state.
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
  for step in range(start + 1, config.total_steps + 1):
    for _ in range(k):
      batch = next(batches)
      n_examples, n_tokens = counts(batch)
      examples, tokens = examples + n_examples, tokens + n_tokens
      state, metrics = parallel.train(state, frozen, parallel.put_batch(batch))
      window.append(metrics)
    bar.update(1)
    last = step == config.total_steps
    if step % config.logging_steps == 0 or last:
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
      log(row)
      bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.1f}")
      window, examples, tokens, t0 = [], 0, 0, time.perf_counter()
    if evaluate is not None and config.eval_steps and step % config.eval_steps == 0:
      evaluate(step, state)
      t0 = time.perf_counter()  # evaluation time is not training throughput
    if save is not None and ((config.save_steps and step % config.save_steps == 0) or last):
      save(step, state)
    if on_step is not None:
      on_step(step)
  bar.close()
  return state


# ---------------------------------------------------------------------------------------------
# A whole run.


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

  def evaluate(self, step: int, parallel: trainer.Parallel, trainable, frozen) -> dict:
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


# The flags of train.flags.add_training that Settings takes under the same names.
SHARED_FLAGS = (
  "output_dir", "learning_rate", "warmup_ratio", "weight_decay", "gradient_accumulation_steps",
  "logging_steps", "eval_steps", "save_steps", "save_total_limit", "parallel", "shard_frozen",
  "seed", "dtype", "progress",
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
    parallel: the mode's placement and compiled steps.
    trainable: the placed trained partition.
    frozen: the placed frozen partition (in the compute dtype).
    params: the trained tree on the host side for exports: trained leaves combined with the
      frozen base as loaded (float32).
  """

  results: dict
  parallel: trainer.Parallel
  trainable: Any
  frozen: Any
  params: Any


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


def _compute_dtype(frozen, dtype: str):
  if dtype != "bfloat16":
    return frozen
  # frozen base in bf16; adapters, trained extras and optimizer state stay float32
  return jax.tree.map(
    lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen
  )


def run(
  params,
  task: Task,
  settings: Settings,
  *,
  signature: dict,
  extra_trainable=(),
  on_step: Callable[[int], None] | None = None,
) -> Trained:
  """Trains ``params``' adapters (and ``extra_trainable`` leaves) on ``task``, or resumes.

  Writes ``metrics.jsonl``, ``eval_results.json``, ``curves.png`` and ``checkpoints/`` under
  ``settings.output_dir``. A checkpoint there from another ``signature`` or another trainable
  layout is refused (:class:`checkpoints.CheckpointMismatch`).
  """
  out = pathlib.Path(settings.output_dir)
  main_process = jax.process_index() == 0
  mask = lora_jax.trainable_mask(params, extra_trainable)
  trainable, base = lora_jax.partition(params, mask)
  frozen = _compute_dtype(base, settings.dtype)
  total, k = settings.total_steps, settings.gradient_accumulation_steps
  schedule = trainer.make_schedule(
    settings.lr_scheduler_type,
    settings.learning_rate,
    total,
    math.ceil(settings.warmup_ratio * total),
  )
  tx = trainer.make_optimizer(
    params,
    schedule,
    weight_decay=settings.weight_decay,
    accumulation=k,
    extra_trainable=extra_trainable,
    max_grad_norm=settings.max_grad_norm,
  )
  axis = trainer.AXIS if settings.parallel == "pmap" else None
  parallel = trainer.Parallel(
    settings.parallel,
    trainer.make_train_step(task.loss, tx, axis),
    task.eval_step,
    shard_frozen=settings.shard_frozen,
  )

  host_state = jax.tree.map(np.asarray, trainer.init_state(trainable, tx, settings.seed))
  ckpt = checkpoints.Checkpointer(
    out / "checkpoints", signature, max_to_keep=settings.save_total_limit
  )
  log = outputs.MetricsLog(out, enabled=main_process)
  latest = ckpt.latest_step()
  if latest is not None:
    host_state, _ = ckpt.restore(latest, host_state)
    log.truncate_after(latest)
    logger.info("resuming from %s (step %d of %d)", ckpt.directory / str(latest), latest, total)
  else:
    log.truncate_after(0)
  state = parallel.put_state(host_state)
  frozen = parallel.put_frozen(frozen)

  evaluated, eval_seconds = {}, []

  def do_eval(step, state):
    t0 = time.perf_counter()
    results = task.evaluate(step, parallel, state.trainable, frozen)
    eval_seconds.append(time.perf_counter() - t0)
    if results:
      log.write({"step": step, **results})
    evaluated[step] = results

  def do_save(step, state):
    host = parallel.host(state)
    ckpt.save(step, host, {"optimizer_step": step, "data_position": int(host.step)})

  batches = task.batches(int(host_state.step), parallel.data_parallel)
  first_step = int(host_state.step) // k
  if settings.eval_on_start and first_step == 0:
    do_eval(0, state)
    eval_seconds.clear()  # before the loop's clock starts
  t0 = time.perf_counter()
  try:
    state = fit(
      parallel,
      state,
      frozen,
      batches,
      LoopConfig(
        total,
        k,
        settings.logging_steps,
        settings.eval_steps,
        settings.save_steps,
        settings.progress,
      ),  # fmt: skip
      schedule=schedule,
      log=log.write,
      counts=task.counts,
      evaluate=do_eval,
      save=do_save,
      on_step=on_step,
    )
  finally:  # an interrupted run still finishes writing the checkpoints it started
    ckpt.wait()
  final_step = int(parallel.host(state.step)) // k
  # This process's training loop, compilation included, evaluations excluded (HF's train_runtime).
  runtime = time.perf_counter() - t0 - sum(eval_seconds)
  results = {
    "step": final_step,
    "train_steps": final_step - first_step,
    "train_runtime_s": round(runtime, 3),
  }
  if final_step not in evaluated:
    do_eval(final_step, state)
  results.update(evaluated[final_step])
  if main_process:
    outputs.write_json(out / outputs.EVAL_RESULTS, results)
    outputs.plot_curves(out / outputs.METRICS, out / outputs.CURVES)
  trained = lora_jax.combine(parallel.host(state.trainable), base)
  return Trained(results, parallel, state.trainable, frozen, trained)
