"""Parallel modes: where state, frozen weights and batches live, and the compiled steps.

Nothing here knows the task: :mod:`train.engine.step` builds the step from the task's loss,
:mod:`train.engine.loop` runs it (checkpoints in :mod:`train.engine.checkpoints`).

Parallel modes (:class:`Parallel`), all giving the same losses for the same global batch:

* ``"none"``: ``jax.jit`` on one device, the state donated.
* ``"pmap"``: ``jax.pmap`` over the local devices; loss sums, weights and gradients summed with
  ``lax.psum``, then divided by the global weight; state and frozen weights replicated once,
  batches split on a leading axis.
* ``"mesh"``: ``jax.jit`` over a ``jax.sharding.Mesh`` with one ``"data"`` axis spanning every
  device of every process: batches sharded on that axis, state replicated, frozen weights
  replicated or (``shard_frozen``) split FSDP-style along their largest divisible axis.

Multi-host: :func:`maybe_initialize_distributed` calls ``jax.distributed.initialize()`` when the
environment says the job spans several processes; each process then feeds its own slice of
every global batch (:meth:`Parallel.local_rows`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train.engine.kinds import PARALLEL_MODES

logger = logging.getLogger(__name__)

AXIS = "data"
MODES = PARALLEL_MODES
_MULTI_PROCESS_ENV = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def wait_for_coordinator(address: str, timeout: float, poll_s: float = 0.5) -> None:
  """Return once ``address`` (``host:port``) accepts a TCP connection; raise ``ConnectionError``
  naming it if it does not within ``timeout`` seconds.

  JAX's own wait ends the whole process with a C++ abort and a stack trace; this check comes
  first so that an unreachable coordinator is one line.
  """
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=poll_s):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConnectionError(
          f"cannot reach the coordinator at {address} (JAX_COORDINATOR_ADDRESS) within "
          f"{timeout:g} s ({e.strerror or e}); is process 0 running? (--distributed_timeout)"
        ) from None
      time.sleep(poll_s)


def maybe_initialize_distributed(environ=os.environ, timeout: int = 300) -> bool:
  """``jax.distributed.initialize()`` for multi-process jobs; never for a single process.

  A job is multi-process when ``JAX_COORDINATOR_ADDRESS`` is set, or one of
  ``JAX_NUM_PROCESSES`` / ``SLURM_NTASKS`` / ``OMPI_COMM_WORLD_SIZE`` is above 1.
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, when set, are passed on; JAX detects the rest
  (Slurm, Open MPI, Cloud TPU). Must run before anything touches a device. ``timeout``
  (``--distributed_timeout``) is JAX's ``initialization_timeout``; a process other than 0 first
  waits that long for ``JAX_COORDINATOR_ADDRESS`` to accept a connection
  (:func:`wait_for_coordinator`: ``ConnectionError``, one line, if it never does). JAX's
  heartbeat timeout is ``2 * timeout + 10`` s, past :mod:`train.engine.peers`' ``timeout``.
  """
  counts = [int(environ.get(k, "1") or 1) for k in _MULTI_PROCESS_ENV]
  if not environ.get("JAX_COORDINATOR_ADDRESS") and max(counts) <= 1:
    return False
  # JAX's heartbeat timeout past train.engine.peers' (``timeout``): a lost process is named in
  # one line by the survivors before the coordination service aborts them.
  kwargs = {"initialization_timeout": timeout, "heartbeat_timeout_seconds": 2 * timeout + 10}
  address = environ.get("JAX_COORDINATOR_ADDRESS")
  if address and int(environ.get("JAX_PROCESS_ID", "0") or 0) != 0:
    wait_for_coordinator(address, timeout)
  if environ.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(environ["JAX_NUM_PROCESSES"])
  if environ.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  return True


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


def held_here(tree) -> tuple[int, int]:
  """``(bytes, devices)``: what ``tree``'s arrays take on this process's devices (every shard
  and replica held here), and on how many of them.

  Example:
    >>> import jax.numpy as jnp
    >>> held_here({"w": jnp.zeros((4, 8), jnp.float32)})  # one device holds it whole
    (128, 1)
  """
  shards = [s for x in jax.tree.leaves(tree) for s in x.addressable_shards]
  return sum(s.data.nbytes for s in shards), len({s.device for s in shards})


def _via_host(tree):
  """In a multi-process job, ``tree``'s arrays that this process holds alone (a checkpoint or an
  adapter loaded on its first device) as host arrays: ``jax.device_put`` onto devices of every
  process takes each process's slices of a host array, where it would refuse to move a device
  array to other processes' devices (cross-host transfers, off on CPU and GPU)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(
    lambda x: np.asarray(x) if isinstance(x, jax.Array) and x.is_fully_addressable else x, tree
  )


def data_parallel_size(mode: str) -> int:
  """Devices (over all processes) that share one global batch in ``mode``."""
  return 1 if mode == "none" else jax.device_count()


class Parallel:
  """Places state, frozen weights and batches for one mode, and runs the compiled steps.

  Args:
    mode: ``"none"``, ``"pmap"`` or ``"mesh"`` (see the module docstring).
    train_step: from :func:`make_train_step` (built with ``axis_name=AXIS`` for ``"pmap"``).
    eval_step: the task's ``eval_step(trainable, frozen, batch)``, returning per-row outputs.
    shard_frozen: ``"mesh"`` only: shard the frozen weights instead of replicating them.
  """

  def __init__(self, mode: str, train_step, eval_step, *, shard_frozen: bool = False):
    if mode not in MODES:
      raise ValueError(f"parallel mode {mode!r} is not one of {list(MODES)}")
    if mode == "none" and jax.process_count() > 1:
      raise ValueError("--parallel none runs on one process; use mesh or pmap for multi-host jobs")
    self.mode = mode
    self.shard_frozen = shard_frozen and mode == "mesh"
    self._train_step = train_step
    if mode == "pmap":
      self.devices = jax.local_devices()
      self._stacked = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), P(AXIS))
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

  def _sharding(self, part: str):
    """``leaf -> sharding`` of one part of the step's arguments (``"state"``, ``"frozen"`` or
    ``"batch"``) in this mode: the one choice :meth:`put_state`, :meth:`put_frozen`,
    :meth:`put_batch` and :meth:`placed_shapes` all follow. In ``"pmap"`` mode each leaf is
    stacked (or a batch split) on a leading device axis first."""
    if self.mode == "pmap":
      return lambda x: self._stacked
    if self.mode == "mesh":
      if part == "batch":
        return lambda x: self.sharded
      if part == "frozen" and self.shard_frozen:
        return lambda x: NamedSharding(self.mesh, _fsdp_spec(x, self.mesh.size))
      return lambda x: self.replicated
    # committed to the device, as the step's outputs are: its second call must not compile again
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return lambda x: device

  def _put(self, tree, part: str):
    sharding = self._sharding(part)
    if self.mode == "pmap":  # a leading device axis (jax.device_put_replicated is deprecated)
      n = len(self.devices)

      def stacked(x):
        return jax.device_put(np.broadcast_to(np.asarray(x)[None], (n, *np.shape(x))), sharding(x))

      return jax.tree.map(stacked, tree)
    return jax.device_put(_via_host(tree), jax.tree.map(sharding, tree))

  def put_state(self, state):
    """The training state placed for the steps: replicated (``"pmap"``: stacked) on them."""
    return self._put(state, "state")

  def put_frozen(self, frozen):
    """The frozen weights placed for the steps: as the state, or FSDP-sharded (``shard_frozen``)."""
    return self._put(frozen, "frozen")

  def put_batch(self, batch: dict) -> dict:
    """A global batch (numpy, same on every process) placed for the step functions.

    Every array is split along its leading axis (examples, or a packed batch's rows and groups,
    see :mod:`train.data.packing`), evenly over processes and then devices.
    """
    local = {k: v[self.local_rows(v.shape[0])] for k, v in batch.items()}
    if self.mode == "pmap":
      d = len(self.devices)
      return {k: v.reshape(d, v.shape[0] // d, *v.shape[1:]) for k, v in local.items()}
    if self.mode == "mesh":
      sharding = self._sharding("batch")
      return {
        k: jax.make_array_from_process_local_data(sharding(v), v, batch[k].shape)
        for k, v in local.items()
      }
    return local

  def train_program(self):
    """The jitted program :meth:`train` runs, for ``.lower`` or ``jax.export``: in ``"pmap"``
    mode the jit of a ``jax.shard_map`` of the step over the local devices, each device's
    slice with its leading axis dropped, which is how ``jax.pmap`` builds its program (jax
    0.10), since ``jax.export`` takes jitted functions only."""
    if self.mode != "pmap":
      return self._train
    step = self._train_step

    def per_device(state, frozen, batch):
      drop = functools.partial(jax.tree.map, lambda x: x[0])
      out = step(drop(state), drop(frozen), drop(batch))
      return jax.tree.map(lambda x: x[None], out)

    program = jax.shard_map(per_device, mesh=self._stacked.mesh, in_specs=P(AXIS),
                            out_specs=P(AXIS), check_vma=False)  # fmt: skip
    return jax.jit(program, donate_argnums=(0,))

  def placed_shapes(self, state, frozen, batch):
    """``(state, frozen, batch)`` as :meth:`put_state`, :meth:`put_frozen` and
    :meth:`put_batch` would place them, as ``jax.ShapeDtypeStruct`` trees with their shardings:
    :meth:`train_program`'s arguments, nothing placed. Takes arrays or shapes (``batch``: a
    global batch)."""

    def shaped(tree, part):
      sharding = self._sharding(part)

      def one(x):
        shape = tuple(x.shape)
        if self.mode == "pmap":
          n = len(self.devices)
          shape = (n, shape[0] // n, *shape[1:]) if part == "batch" else (n, *shape)
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding(x))

      return jax.tree.map(one, tree)

    return shaped(state, "state"), shaped(frozen, "frozen"), shaped(batch, "batch")

  def context(self):
    """The context the steps are traced in: in ``"mesh"`` mode the mesh (``jax.set_mesh``), so
    code inside a step can split its rows over it (Pallas's attention kernels do, see
    :mod:`lora_jax.models.layers.attention`); else nothing."""
    return jax.set_mesh(self.mesh) if self.mode == "mesh" else contextlib.nullcontext()

  def train(self, state, frozen, batch):
    """One step: the new state and its metrics (scalars, as the step returns them)."""
    with self.context():
      state, metrics = self._train(state, frozen, batch)
    if self.mode == "pmap":
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return state, metrics

  def eval(self, trainable, frozen, batch) -> np.ndarray:
    """The eval step's per-row outputs for the whole global batch, on every process's host."""
    with self.context():
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
