"""``train/run_clm.py`` taking turns with another process: lora_jax's side of a lockstep run.

``bench/clm_recipe.py`` runs this beside ``bench/peft_clm_recipe.py --lockstep`` and alternates
their optimizer steps, so a busy shared CPU slows both sides alike (``bench/schedule.py``
does the same for the step benchmark). The run is ``run_clm.py``'s own (same flags, outputs and
step times in ``metrics.jsonl``); in its ``on_step`` hook, which the loop leaves out of the
logged step times, it prints ``BENCH_READY`` after the first step (set up and compiled for the
first batch shape) and ``BENCH_STEP <step>`` after each later one, and before every step but
the first waits for ``go`` on stdin (:class:`bench.measure.Baton`).

Usage (repository root; needs ``--max_steps``, so that the last step waits for nothing, and
``--logging_steps 1``, so that each step has ended when the hook runs):
  python -m bench.clm_lockstep --config configs/smollm2_dates.yaml --max_steps 12 ...
"""

from __future__ import annotations

import sys

from bench import measure
from train.cli.main import run_script
from train.tasks.clm import args as clm_args


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = clm_args.parse_args(argv)
  total = args.max_steps
  if total <= 0 or args.logging_steps != 1:  # a step ends (synchronised) when it is logged
    print("bench.clm_lockstep: error: a lockstep run needs --max_steps > 0 and --logging_steps 1",
          file=sys.stderr)  # fmt: skip
    return 2
  baton = measure.Baton(lockstep=True)

  def take_turn(step: int) -> None:
    if step == 1:
      baton.ready()
    else:
      print(f"{measure.STEP_MARK}{step}", flush=True)
    if step < total:
      baton.wait()

  code = run_script("run_clm.py", clm_args.parse_args, "train.tasks.clm.pipeline", argv, take_turn)
  measure.emit({"exit": code})  # the parent's end of the run (the figures are in the files)
  return code


if __name__ == "__main__":
  sys.exit(main())
