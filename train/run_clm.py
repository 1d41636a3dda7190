"""Supervised fine-tuning of a causal LM with LoRA: ``python train/run_clm.py [flags]``.

Flags follow transformers' ``run_clm.py`` and TRL's ``SFTConfig`` (``--help`` lists them); a
YAML ``--config FILE`` holds flag values. The offline quickstart (about a minute on 2 CPU
cores, nothing but ``pip install -e .``):

  python train/run_clm.py --config configs/clm_quickstart.yaml

Also ``python -m train.run_clm [flags]``. The work happens in
:func:`train.tasks.clm.pipeline.train_and_evaluate`; this file parses the flags (before jax is
imported, so a bad flag or ``--help`` costs no startup) and turns errors into one line.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # `python train/run_clm.py`: sys.path[0] is train/; make it
  # the repository root, as `python -m train.run_clm` has it, so `train` is a package
  sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

from train.cli.main import run_script  # noqa: E402
from train.tasks.clm import args  # noqa: E402  (light: flags are checked before jax is imported)


def main(argv=None) -> int:
  return run_script("run_clm.py", args.parse_args, "train.tasks.clm.pipeline", argv)


if __name__ == "__main__":
  sys.exit(main())
