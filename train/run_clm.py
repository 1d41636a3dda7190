"""Supervised fine-tuning of a causal LM with LoRA: ``python train/run_clm.py [flags]``.

Flags follow transformers' ``run_clm.py`` and TRL's ``SFTConfig`` (``--help`` lists them); a
YAML ``--config FILE`` holds flag values. The offline quickstart (about a minute on 2 CPU
cores, nothing but ``pip install -e .``):

  python train/run_clm.py --config configs/clm_quickstart.yaml

The work happens in :func:`train.clm_train.train_and_evaluate`; this file parses the flags
(before jax is imported, so a bad flag costs no startup) and turns errors into one line.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # `python train/run_clm.py`: make `train` and `lora_jax` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from train import clm_args  # noqa: E402  (light: flags are checked before jax is imported)
from train import flags  # noqa: E402


def main(argv=None) -> int:
  return flags.run_script("run_clm.py", clm_args.parse_args, "train.clm_train", argv)


if __name__ == "__main__":
  sys.exit(main())
