"""A training script's entry point: flags, logging, the run, and one-line errors."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable

from train.cli.flags import as_dict
from train.cli.logs import configure_logging
from train.engine.errors import first_line


def run_script(
  name: str, parse_args: Callable, task_module: str, argv=None, on_step: Callable | None = None
) -> int:
  """A training script's ``main``: flags first (checked before jax is imported), then logging,
  ``jax.distributed`` when launched multi-host, and ``task_module.train_and_evaluate(args)``.

  The run holds ``--output_dir`` while it works (:func:`train.engine.rundir.claim`: a second
  run on it fails at once); a rerun there with other settings needs ``--overwrite_output_dir``
  (:func:`train.engine.rundir.check_rerun`). Bad input found while running (a missing column, a
  file that does not exist, ...), an unreachable ``JAX_COORDINATOR_ADDRESS``
  (``--distributed_timeout``), a directory in use or not writable and a diverged training
  (``train.engine.loop.Diverged``) end it with one line, ``NAME: error: ...``, and exit status
  2, as a bad flag does; the final results are printed as ``key=value`` pairs.
  ``on_step(step)`` runs after each optimizer step (the benchmark's turn-taking; its time is not
  in the logged step times). Orbax's "Event loop is closed" noise is dropped while the run works
  (:func:`train.engine.checkpoints.quiet_closed_event_loops`).
  """
  args = parse_args(argv)
  configure_logging()
  if not getattr(args, "progress", True):  # --no-progress: no bars from datasets' map either
    import datasets

    datasets.disable_progress_bars()
  import jax

  from train.engine import checkpoints
  from train.engine import parallel
  from train.engine import peers
  from train.engine import rundir

  timeout = getattr(args, "distributed_timeout", 300)
  try:
    distributed = parallel.maybe_initialize_distributed(timeout=timeout)
  except ConnectionError as e:  # an unreachable coordinator
    print(f"{name}: error: {e}", file=sys.stderr)
    return 2
  watching = None
  if distributed:  # a lost process ends the others with one line (exit 1), not JAX's abort
    watching = peers.start(peers.client(), jax.process_index(), jax.process_count(), timeout, name)
  claim = rundir.claim(args.output_dir) if jax.process_index() == 0 else contextlib.nullcontext()
  import pickle

  import jinja2

  try:
    with claim, checkpoints.quiet_closed_event_loops():
      if jax.process_index() == 0:
        rundir.check_rerun(args.output_dir, as_dict(args), args.overwrite_output_dir)
      results = importlib.import_module(task_module).train_and_evaluate(args, on_step)
  except KeyboardInterrupt:  # checkpoints already written are complete (run() waits for them)
    print(f"{name}: interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  # OSError: a full disk, a read-only folder; UnpicklingError: torch.load(weights_only=True)
  # refusing a pickled checkpoint; TemplateError: a chat template's sandbox or raise_exception.
  except (ValueError, OSError, NotImplementedError, FloatingPointError, pickle.UnpicklingError,
          jinja2.TemplateError) as e:  # fmt: skip
    why = first_line(e)
    if watching is not None:  # a lost process's broken collective first lets the watch name it
      watching.end(f"{name}: error: {why}", 2, e)
    print(f"{name}: error: {why}", file=sys.stderr)
    return 2
  except Exception as e:  # a collective whose peer was lost (JaxRuntimeError); else a bug
    if watching is not None and peers.broke(e):
      watching.end(f"{name}: error: {first_line(e)}", 1, e)
    raise
  if watching is not None:
    watching.finish()
  print(
    " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items())
  )
  return 0
