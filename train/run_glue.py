"""LoRA fine-tuning on GLUE with lora_jax, in the style of Hugging Face's ``run_glue.py``.

Usage:
  # Offline default: a small BERT from a config and generated data (about 30 s on CPU)
  python train/run_glue.py --config configs/quickstart.yaml

  # The real all-MiniLM-L6-v2 from .cache, SST-2 from ../shared (about 2 min on CPU)
  python train/run_glue.py --config configs/sst2_minilm.yaml

  # With the Hugging Face Hub: roberta-base on the Hub's GLUE SST-2
  python train/run_glue.py --config configs/roberta-base/sst2.yaml

  # Any flag overrides the config file; rerunning on an output_dir with checkpoints resumes.
  python train/run_glue.py --config configs/sst2_minilm.yaml --max_steps 500 --parallel mesh

Outputs in ``--output_dir``: metrics.jsonl, eval_results.json, curves.png, checkpoints/,
predict_results.tsv (``--do_predict``), adapter/ (PEFT format), merged/ (``--export_merged``).
See ``python train/run_glue.py --help`` for every flag; ``python -m train.run_glue`` runs the same.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):  # `python train/run_glue.py`: sys.path[0] is train/; make it
  # the repository root, as `python -m train.run_glue` has it, so `train` is a package
  sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

from train.cli.main import run_script  # noqa: E402
from train.tasks.glue import args  # noqa: E402  (light: flags are checked before jax is imported)


def main(argv=None) -> int:
  return run_script("run_glue.py", args.parse_args, "train.tasks.glue.pipeline", argv)


if __name__ == "__main__":
  sys.exit(main())
