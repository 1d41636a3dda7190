"""A run's training step lowered for a platform that need not be here (``jax.export``).

:func:`export_train_step` lowers the step :func:`train.engine.run.run` would compile for a
:class:`train.engine.run.Plan` (the scripts' ``plan(args)``: the same loss, optimizer, parallel
mode, shardings and first batch) for ``"cuda"`` or ``"tpu"`` from any machine, on shapes alone:
nothing is placed or run. Platform-dependent choices are made as the program is lowered for its
platform (``attention_implementation="pallas"``: Triton's kernel for ``cuda``, Mosaic's for
``tpu``), so each exported program is the one that platform would run. A program that does not
lower raises :class:`LoweringFailed` naming the program and the platform.

Example (the CLM quickstart's step, lowered for a TPU)::

  from train.tasks.clm import args, pipeline
  plan = pipeline.plan(args.parse_args(["--config", "configs/clm_quickstart.yaml"]))
  exported = export_train_step(plan, "tpu", "run_clm.py")
  print(exported.mlir_module()[:200])
"""

from __future__ import annotations

import jax

from lora_jax.models.layers.attention import kernel_export_checks
from train.engine import run
from train.engine.errors import first_line

PLATFORMS = ("cuda", "tpu")


class LoweringFailed(RuntimeError):
  """A program that does not lower for a platform; the message names both."""


def export_train_step(plan: run.Plan, platform: str, name: str = "the run") -> jax.export.Exported:
  """The training step of ``plan`` lowered for ``platform`` (:data:`PLATFORMS`, or ``"cpu"``),
  with the parallel mode's shardings and the run's first global batch's shapes.

  Raises:
    LoweringFailed: the step does not lower for ``platform`` (``name`` and ``platform`` named,
      with the error's first line).
  """
  prepared = run.prepare(plan)
  parallel = prepared.parallel
  state = jax.eval_shape(prepared.init_state, plan.settings.seed)
  frozen = jax.eval_shape(lambda: prepared.frozen)
  batch = next(iter(plan.task.batches(0, parallel.data_parallel)))
  args = parallel.placed_shapes(state, frozen, batch)
  checks = kernel_export_checks()
  try:
    with parallel.context():
      program = jax.export.export(
        parallel.train_program(), platforms=(platform,), disabled_checks=checks
      )
      return program(*args)
  except Exception as e:
    first = first_line(e)
    raise LoweringFailed(
      f"{name}: the training step ({plan.settings.parallel} mode) does not lower for "
      f"{platform}: {type(e).__name__}: {first}"
    ) from e
