"""The seed experiment of the LoRA write-ups, end to end through lora_jax
(:mod:`train.tasks.synthetic`).

1. Data ``y = X @ theta`` (theta of shape (1001, 1000), 10,000 rows). Pretrain a bias-free
   linear layer with Adam until its MSE is below 1e-2.
2. Shift the task to ``theta + 1``: the frozen model's loss jumps (to about 1000).
3. Add a rank-1 adapter and train only it: the loss recovers, and ``scale * A @ B`` is the matrix
   of ones, learned with 2,001 trainable parameters against the layer's 1,001,000.

Usage:
  python train/run_synthetic.py    # the full experiment (minutes on 2 CPU cores)
  python train/run_synthetic.py --n_in 101 --n_out 100 --rows 2000   # scaled down
  python -m train.run_synthetic    # the same
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # `python train/run_synthetic.py`: sys.path[0] is train/; make it
  # the repository root, as `python -m train.run_synthetic` has it, so `train` is a package
  sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument("--n_in", type=int, default=1001)
  parser.add_argument("--n_out", type=int, default=1000)
  parser.add_argument("--rows", type=int, default=10_000)
  parser.add_argument("--rank", type=int, default=1)
  parser.add_argument("--max_steps", type=int, default=3000)
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch", type=int, default=1000, help="rows per Adam step")
  args = parser.parse_args(argv)
  from train.tasks import synthetic  # jax: after the flags

  result = synthetic.run(
    args.n_in,
    args.n_out,
    args.rows,
    args.rank,
    1e-2,
    args.max_steps,
    args.lr,
    args.seed,
    args.batch,
  )
  print(json.dumps(result, indent=2))
  ok = result["pretrained_mse"] < 1e-2 and result["lora_mse"] < 1e-2
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
