"""Command-line flags of ``train/run_glue.py``, Hugging Face ``run_glue.py`` style, plus YAML
(``--config FILE``; see :mod:`train.cli.config_file`; the shared flags: :mod:`train.cli.flags`).

Example:
  >>> args = parse_args(["--task_name", "sst2", "--model_name_or_path", "m", "--lora_r", "4"])
  >>> args.lora_r, args.lora_alpha, args.parallel
  (4, 16.0, 'none')
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from train.cli import config_file
from train.cli import flags

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
DEFAULT_MODEL = "roberta-base"  # --model_name_or_path when neither it nor --config_name is given


def build_parser() -> flags.OneLineParser:
  """All flags, with their defaults (which a ``--config`` file then overrides)."""
  p = flags.new_parser(
    "run_glue.py", "LoRA fine-tuning on a GLUE task with lora_jax (see train/run_glue.py)."
  )
  g = p.add_argument_group("model and data")
  flags.add_model(g, DEFAULT_MODEL)
  g.add_argument("--task_name", choices=GLUE_TASKS, default="sst2", help="the GLUE task")
  for action in (
    g.add_argument(
      "--train_file", help="TSV/CSV/JSON training file; if not given: the Hub's GLUE dataset"
    ),
    g.add_argument("--validation_file", help="TSV/CSV/JSON validation file"),
    g.add_argument("--test_file", help="TSV/CSV/JSON test file (for --do_predict)"),
  ):
    flags.mark_path(action)
  g.add_argument(
    "--max_seq_length",
    type=flags.positive_int,
    default=128,
    help="tokens per example; longer ones are truncated",
  )
  g.add_argument(
    "--max_train_samples", type=flags.positive_int, help="keep the first N training rows"
  )
  g.add_argument("--max_eval_samples", type=flags.positive_int, help="keep the first N eval rows")
  g.add_argument(
    "--max_predict_samples", type=flags.positive_int, help="keep the first N test rows"
  )
  g = p.add_argument_group("training")
  flags.add_training(
    g, batch=32, eval_batch=64, learning_rate=5e-4, warmup=0.06, epochs=3.0, save_steps=500,
    output_dir="outputs/glue",
  )  # fmt: skip
  g.add_argument(
    "--do_predict",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="write predictions for the test split (--test_file, or the Hub's) to OUTPUT_DIR",
  )
  g.add_argument(
    "--pack_sequences",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="padding-free batches: sequences share rows of max_seq_length tokens, attention "
    "masked to each sequence (same logits as padded rows, fewer tokens); --no-pack_sequences "
    "pads each batch to a bucketed length instead",
  )
  g = p.add_argument_group("LoRA")
  flags.add_lora(g, targets=["query", "value"], dropout=0.1)
  g.add_argument(
    "--ignore_mismatched_sizes",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="with --adapter_name_or_path: keep this task's new classifier head when the saved one "
    "has another shape (e.g. an MNLI adapter, 3 labels, starting RTE)",
  )
  return p


def _check(args: argparse.Namespace, parser: flags.OneLineParser) -> argparse.Namespace:
  """The model source (:func:`flags.resolve_model`); ``--do_predict`` needs a test split."""
  flags.resolve_model(args, parser, DEFAULT_MODEL)
  local = [f for f in ("train_file", "validation_file") if getattr(args, f)]
  if args.do_predict and not args.test_file and local:
    parser.error(
      f"argument --do_predict: no test split to predict: the data are local files "
      f"(--{local[0]} {getattr(args, local[0])!r}) and --test_file is not given; give "
      "--test_file, or --no-do_predict"
    )
  return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Flags from ``--config`` (if any), then from ``argv`` (default ``sys.argv[1:]``).

  Either ``--model_name_or_path`` (default roberta-base) or ``--config_name`` (a new model from
  scratch); the tokenizer defaults to whichever is given.

  Example:
    >>> args = parse_args(["--config_name", "configs/quickstart"])
    >>> args.model_name_or_path, args.tokenizer_name
    (None, 'configs/quickstart')
  """
  return config_file.parse(build_parser(), argv, _check)
