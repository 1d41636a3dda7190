"""Training machinery: state, optimizer, train/eval steps, parallel modes, checkpoints, loop.

Only the trainable partition (adapters + extra-trainable leaves such as a classifier head, from
:func:`lora_jax.partition`) is differentiated, updated, given optimizer state and
checkpointed; the frozen base is an ordinary, non-differentiated argument of every step.

Parallel modes (:class:`Parallel`), all giving the same losses for the same global batch:

* ``"none"``: ``jax.jit`` on one device, the state donated.
* ``"pmap"``: ``jax.pmap`` over the local devices; gradients and loss averaged with
  ``lax.pmean``; state and frozen weights replicated once, batches split on a leading axis.
* ``"mesh"``: ``jax.jit`` over a ``jax.sharding.Mesh`` with one ``"data"`` axis spanning every
  device of every process: batches sharded on that axis, state replicated, frozen weights
  replicated or (``shard_frozen``) split FSDP-style along their largest divisible axis.

Multi-host: :func:`maybe_initialize_distributed` calls ``jax.distributed.initialize()`` when the
environment says the job spans several processes; each process then feeds its own slice of
every global batch (:meth:`Parallel.local_rows`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax

logger = logging.getLogger(__name__)

AXIS = "data"
MODES = ("none", "pmap", "mesh")
_MULTI_PROCESS_ENV = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed(environ=os.environ) -> bool:
  """``jax.distributed.initialize()`` for multi-process jobs; never for a single process.

  A job is multi-process when ``JAX_COORDINATOR_ADDRESS`` is set, or one of
  ``JAX_NUM_PROCESSES`` / ``SLURM_NTASKS`` / ``OMPI_COMM_WORLD_SIZE`` is above 1.
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, when set, are passed on; JAX detects the rest
  (Slurm, Open MPI, Cloud TPU). Must run before anything touches a device.
  """
  counts = [int(environ.get(k, "1") or 1) for k in _MULTI_PROCESS_ENV]
  if not environ.get("JAX_COORDINATOR_ADDRESS") and max(counts) <= 1:
    return False
  kwargs = {}
  if environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
  if environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True


# ---------------------------------------------------------------------------------------------
# State, optimizer, loss.


class TrainState(NamedTuple):
  """Everything that changes during training (the frozen base is not here).

  Attributes:
    step: micro-batches consumed so far (int32 scalar); optimizer steps are
      ``step // gradient_accumulation_steps``, and it is the data position.
    trainable: the trainable partition (``None`` where a leaf is frozen).
    opt_state: optimizer state of ``trainable``.
    rng: ``jax.random.key_data`` of the run's base key; each micro-batch folds ``step`` in.
  """

  step: jax.Array
  trainable: Any
  opt_state: Any
  rng: jax.Array


def init_state(trainable, tx: optax.GradientTransformation, seed: int) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    trainable=trainable,
    opt_state=tx.init(trainable),
    rng=jax.random.key_data(jax.random.key(seed)),
  )


def linear_schedule(learning_rate: float, total_steps: int, warmup_steps: int):
  """Linear warmup from 0 to ``learning_rate``, then linear decay to 0 at ``total_steps``.

  The same curve as transformers' ``get_linear_schedule_with_warmup``.

  Example:
    >>> s = linear_schedule(1.0, 10, 2)
    >>> [round(float(s(i)), 3) for i in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(
  params,
  schedule,
  *,
  weight_decay: float,
  accumulation: int = 1,
  extra_trainable=(),
) -> optax.GradientTransformation:
  """AdamW on the trainable leaves (``lora_jax.lora_optimizer``), accumulated if asked."""
  tx = lora_jax.lora_optimizer(
    optax.adamw(schedule, weight_decay=weight_decay), params, extra_trainable
  )
  return optax.MultiSteps(tx, every_k_schedule=accumulation) if accumulation > 1 else tx


def loss_fn(logits, labels, weights, regression: bool):
  """Weighted mean cross-entropy (classes) or squared error (regression); weight 0 = filler."""
  if regression:
    per_row = jnp.square(logits[:, 0] - labels.astype(jnp.float32))
  else:
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# ---------------------------------------------------------------------------------------------
# Steps.


PACKED_KEYS = ("segment_ids", "cls_index")  # batches from train.packing


def _forward(apply_fn, trainable, frozen, batch, **kwargs):
  variables = lora_jax.combine(trainable, frozen)
  packed = {k: batch[k] for k in PACKED_KEYS if k in batch}
  return apply_fn(
    variables,
    batch["input_ids"],
    batch["attention_mask"],
    batch["token_type_ids"],
    **packed,
    **kwargs,
  )


def make_train_step(apply_fn, tx, regression: bool, axis_name: str | None = None):
  """``step(state, frozen, batch) -> (state, loss)``: one micro-batch, one (maybe partial) update.

  ``apply_fn`` is ``lora_jax.lora_apply(module.apply)``; it gets ``deterministic=False`` and
  rngs for ``"dropout"`` and ``"lora_dropout"`` derived from ``state.rng`` and ``state.step``
  (and the device index under ``pmap``). Under ``axis_name`` loss and gradients are
  ``lax.pmean``-ed.
  """

  def step(state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if axis_name is not None:
      key = jax.random.fold_in(key, lax.axis_index(axis_name))
    k_dropout, k_lora = jax.random.split(key)

    def compute(trainable):
      logits = _forward(
        apply_fn,
        trainable,
        frozen,
        batch,
        deterministic=False,
        rngs={"dropout": k_dropout, "lora_dropout": k_lora},
      )
      return loss_fn(logits, batch["labels"], batch["weights"], regression)

    loss, grads = jax.value_and_grad(compute)(state.trainable)
    if axis_name is not None:
      loss, grads = lax.pmean((loss, grads), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return state._replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), loss

  return step


def make_eval_step(apply_fn):
  """``eval_step(trainable, frozen, batch) -> logits`` (deterministic: no dropout)."""

  def eval_step(trainable, frozen, batch):
    return _forward(apply_fn, trainable, frozen, batch, deterministic=True)

  return eval_step


# ---------------------------------------------------------------------------------------------
# Parallel modes.


def _fsdp_spec(leaf, n: int) -> P:
  """Shard the largest axis divisible by ``n`` (leaves under 64k elements stay replicated)."""
  shape = getattr(leaf, "shape", ())
  if n == 1 or int(np.prod(shape)) < 2**16:
    return P()
  axes = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
  if not axes:
    return P()
  spec = [None] * len(shape)
  spec[axes[0]] = AXIS
  return P(*spec)


def data_parallel_size(mode: str) -> int:
  """Devices (over all processes) that share one global batch in ``mode``."""
  return 1 if mode == "none" else jax.device_count()


class Parallel:
  """Places state, frozen weights and batches for one mode, and runs the compiled steps.

  Args:
    mode: ``"none"``, ``"pmap"`` or ``"mesh"`` (see the module docstring).
    train_step: from :func:`make_train_step` (built with ``axis_name=AXIS`` for ``"pmap"``).
    eval_step: from :func:`make_eval_step`.
    shard_frozen: ``"mesh"`` only: shard the frozen weights instead of replicating them.
  """

  def __init__(self, mode: str, train_step, eval_step, *, shard_frozen: bool = False):
    if mode not in MODES:
      raise ValueError(f"parallel mode {mode!r} is not one of {list(MODES)}")
    if mode == "none" and jax.process_count() > 1:
      raise ValueError("--parallel none runs on one process; use mesh or pmap for multi-host jobs")
    self.mode = mode
    self.shard_frozen = shard_frozen and mode == "mesh"
    if mode == "pmap":
      self.devices = jax.local_devices()
      self._train = jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,))
      self._eval = jax.pmap(eval_step, axis_name=AXIS)
    elif mode == "mesh":
      self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
      self.replicated = NamedSharding(self.mesh, P())
      self.sharded = NamedSharding(self.mesh, P(AXIS))
      self._train = jax.jit(
        train_step, donate_argnums=(0,), out_shardings=(self.replicated, self.replicated)
      )
      self._eval = jax.jit(eval_step, out_shardings=self.sharded)
    else:
      self._train = jax.jit(train_step, donate_argnums=(0,))
      self._eval = jax.jit(eval_step)

  @property
  def data_parallel(self) -> int:
    """How many devices (over all processes) share a global batch."""
    return data_parallel_size(self.mode)

  def local_rows(self, n_global: int) -> slice:
    """This process's rows of a global batch of ``n_global`` rows."""
    per = n_global // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)

  def put_state(self, state):
    if self.mode == "pmap":  # a leading device axis (jax.device_put_replicated is deprecated)
      stacked = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), P(AXIS))
      n = len(self.devices)
      return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (n, *np.shape(x))), stacked),
        state,
      )
    if self.mode == "mesh":
      return jax.device_put(state, self.replicated)
    return jax.device_put(state)

  def put_frozen(self, frozen):
    if self.mode == "mesh" and self.shard_frozen:
      n = self.mesh.size
      shardings = jax.tree.map(lambda x: NamedSharding(self.mesh, _fsdp_spec(x, n)), frozen)
      return jax.device_put(frozen, shardings)
    return self.put_state(frozen)

  def put_batch(self, batch: dict) -> dict:
    """A global batch (numpy, same on every process) placed for the step functions.

    Every array is split along its leading axis (examples, or a packed batch's rows and groups,
    see :mod:`train.packing`), evenly over processes and then devices.
    """
    local = {k: v[self.local_rows(v.shape[0])] for k, v in batch.items()}
    if self.mode == "pmap":
      d = len(self.devices)
      return {k: v.reshape(d, v.shape[0] // d, *v.shape[1:]) for k, v in local.items()}
    if self.mode == "mesh":
      return {
        k: jax.make_array_from_process_local_data(self.sharded, v, batch[k].shape)
        for k, v in local.items()
      }
    return local

  def train(self, state, frozen, batch):
    state, loss = self._train(state, frozen, batch)
    return state, (loss[0] if self.mode == "pmap" else loss)

  def eval(self, trainable, frozen, batch) -> np.ndarray:
    """Logits for the whole global batch, on the host of every process."""
    out = self._eval(trainable, frozen, batch)
    if self.mode == "pmap":
      out = np.asarray(out).reshape(-1, *out.shape[2:])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(out, tiled=True))
    return np.asarray(out)

  def host(self, tree):
    """A placed tree (state or trainable params) as numpy arrays on the host."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: np.asarray(x[0]), tree)
    return jax.tree.map(np.asarray, tree)


# ---------------------------------------------------------------------------------------------
# Checkpoints.


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
  """Orbax ``CheckpointManager`` for the trainable state under ``directory``.

  Each checkpoint holds two items: ``state`` (trainable leaves, optimizer state, step = data
  position, rng; never the frozen base) and ``meta`` (JSON: the run's ``signature``, e.g.
  model and LoRA settings, and every leaf's shape). Restoring compares both with the current run
  and refuses, listing every difference, when they disagree.
  """

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


# ---------------------------------------------------------------------------------------------
# The loop.


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
  parallel: Parallel,
  state,
  frozen,
  batches: Iterator[dict],
  config: LoopConfig,
  *,
  schedule: Callable[[int], Any],
  log: Callable[[dict], None],
  evaluate: Callable[[int, Any], dict] | None = None,
  save: Callable[[int, Any], None] | None = None,
  on_step: Callable[[int], None] | None = None,
):
  """Runs optimizer steps from the one ``state`` is at up to ``config.total_steps``.

  Args:
    parallel: the mode's placement and steps.
    state: placed :class:`TrainState`.
    frozen: placed frozen partition.
    batches: global numpy micro-batches, starting at ``state.step`` (the data position).
    config: totals and intervals.
    schedule: learning rate by optimizer step (for the logs).
    log: receives one dict per logged step (``step``, ``loss``, ``learning_rate``,
      ``examples_per_s``, ``tokens_per_s``).
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
  losses, examples, tokens, t0 = [], 0, 0, time.perf_counter()
  step = start
  for step in range(start + 1, config.total_steps + 1):
    for _ in range(k):
      batch = next(batches)
      examples += int(batch["weights"].sum())
      tokens += int(batch["attention_mask"].sum())
      state, loss = parallel.train(state, frozen, parallel.put_batch(batch))
      losses.append(loss)
    bar.update(1)
    last = step == config.total_steps
    if step % config.logging_steps == 0 or last:
      loss = float(np.mean([float(x) for x in losses]))  # waits for the steps to finish
      dt = time.perf_counter() - t0
      row = {
        "step": step,
        "loss": loss,
        "learning_rate": float(schedule(step - 1)),
        "examples_per_s": round(examples / dt, 2),
        "tokens_per_s": round(tokens / dt, 1),
        "s_per_step": round(dt * k / max(len(losses), 1), 4),
      }
      log(row)
      bar.set_postfix(loss=f"{row['loss']:.4f}", ex_s=f"{row['examples_per_s']:.1f}")
      losses, examples, tokens, t0 = [], 0, 0, time.perf_counter()
    if evaluate is not None and config.eval_steps and step % config.eval_steps == 0:
      evaluate(step, state)
      t0 = time.perf_counter()  # evaluation time is not training throughput
    if save is not None and ((config.save_steps and step % config.save_steps == 0) or last):
      save(step, state)
    if on_step is not None:
      on_step(step)
  bar.close()
  return state
