"""The training loop and everything around it, the same for every script.

:func:`run` takes the parameters (adapters in), the task (:class:`Task`: its loss, batches,
evaluation) and the run's :class:`Settings`, and does the rest: optimizer and schedule,
parallel mode, the bf16 frozen base, Orbax checkpoints of the trainable state (resuming from
the newest one that fits this run), the metrics log, periodic evaluation and saving, and the
final evaluation. ``train/run_glue.py`` and ``train/run_clm.py`` differ only in their tasks.
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
import jax.numpy as jnp
import numpy as np

import lora_jax
from train import checkpoints
from train import outputs
from train import trainer

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
    train.loop.Diverged: the training loss is nan at step 4 (learning rate 0.001): ...
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
    on_step: called after each optimizer step (tests use it to simulate a crash, the benchmark
      to take turns with another process); its time is left out of the logged throughputs.

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
    evaluates = evaluate is not None and config.eval_steps and step % config.eval_steps == 0
    saves = save is not None and ((config.save_steps and step % config.save_steps == 0) or last)
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
      log(row)
      bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.1f}")
      window, examples, tokens, t0 = [], 0, 0, time.perf_counter()
    if evaluates:
      evaluate(step, state)
      t0 = time.perf_counter()  # evaluation time is not training throughput
    if saves:
      save(step, state)
    if on_step is not None:
      hook = time.perf_counter()
      on_step(step)
      t0 += time.perf_counter() - hook  # the caller's time is not training throughput either
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
  loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate / A's


# The flags of train.flags.add_training that Settings takes under the same names.
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
  parallel: trainer.Parallel | None
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


def _compute_dtype(frozen, dtype: str):
  if dtype != "bfloat16":
    return frozen

  # frozen base in bf16; adapters, trained extras and optimizer state stay float32; quantized
  # kernels keep their stored arrays (their scales too), the module computes in bf16
  def cast(x):
    if isinstance(x, lora_jax.QuantizedArray) or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x.astype(jnp.bfloat16)

  return jax.tree.map(cast, frozen, is_leaf=lambda x: isinstance(x, lora_jax.QuantizedArray))


def training_signature(settings: Settings) -> str:
  """The settings a resumed run must share with the checkpoint (with the task's signature)."""
  fields = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay",
            "max_grad_norm", "gradient_accumulation_steps", "seed", "dtype",
            "loraplus_lr_ratio")  # fmt: skip
  return " ".join(f"{f}={getattr(settings, f)}" for f in fields)


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


def run(
  params,
  task: Task,
  settings: Settings,
  *,
  signature: dict,
  record: dict | None = None,
  extra_trainable=(),
  on_step: Callable[[int], None] | None = None,
  finish: Callable[[Trained], None] | None = None,
) -> Trained:
  """Trains ``params``' adapters (and ``extra_trainable`` leaves) on ``task``, or resumes.

  Writes ``args.json`` (``record``: the flags), ``metrics.jsonl``, ``checkpoints/``, then
  calls ``finish(trained)`` (the script's predictions and exports), and last
  ``eval_results.json`` and ``curves.png``, under ``settings.output_dir``. So a run is finished
  once ``eval_results.json`` is there: rerunning it trains nothing and writes nothing
  (``Trained.finished_before``).

  Resuming: the newest intact checkpoint is used (damaged ones are set aside, see
  :mod:`train.checkpoints`). One from another ``signature``, other training settings
  (:func:`training_signature`) or another trainable layout is refused
  (:class:`checkpoints.CheckpointMismatch`) before anything is written.

  Raises:
    Diverged: a non-finite training loss, gradient norm or final evaluation.
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
    loraplus_lr_ratio=settings.loraplus_lr_ratio,
  )
  axis = trainer.AXIS if settings.parallel == "pmap" else None
  parallel = trainer.Parallel(
    settings.parallel,
    trainer.make_train_step(task.loss, tx, axis),
    task.eval_step,
    shard_frozen=settings.shard_frozen,
  )

  host_state = jax.tree.map(np.asarray, trainer.init_state(trainable, tx, settings.seed))
  signature = {**signature, "training": training_signature(settings)}
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

  hook_seconds = []

  def hook(step):  # the caller's on_step is not training time (a benchmark's turn-taking)
    t0 = time.perf_counter()
    on_step(step)
    hook_seconds.append(time.perf_counter() - t0)

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
      on_step=None if on_step is None else hook,
    )
  finally:  # an interrupted run still finishes writing the checkpoints it started
    ckpt.wait()
  final_step = int(parallel.host(state.step)) // k
  # This process's training loop, compilation included, evaluations and on_step excluded (HF's
  # train_runtime).
  runtime = time.perf_counter() - t0 - sum(eval_seconds) - sum(hook_seconds)
  results = {
    "step": final_step,
    "train_steps": final_step - first_step,
    "train_runtime_s": round(runtime, 3),
  }
  if final_step not in evaluated:
    do_eval(final_step, state)
  results.update(evaluated[final_step])
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
