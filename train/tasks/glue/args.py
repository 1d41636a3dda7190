"""Command-line flags of ``train/run_glue.py``, Hugging Face ``run_glue.py`` style, plus YAML
(``--config FILE``; see :mod:`train.cli.config_file`; the shared flags: :mod:`train.cli.flags`).

Example:
  >>> args = parse_args(["--task_name", "sst2", "--model_name_or_path", "m", "--lora_r", "4"])
  >>> args.lora_r, args.lora_alpha, args.parallel
  (4, 16.0, 'none')
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from train.cli import config_file
from train.cli import flags

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
DEFAULT_MODEL = "roberta-base"  # --model_name_or_path when neither it nor --config_name is given


@dataclasses.dataclass
class GlueModelData(flags.ModelConfig):
  """The model (:class:`train.cli.flags.ModelConfig`), and the GLUE task's data."""

  task_name: str = flags.field("sst2", choices=GLUE_TASKS, help="the GLUE task")
  train_file: str | None = flags.field(
    path=flags.PATH, help="TSV/CSV/JSON training file; if not given: the Hub's GLUE dataset"
  )
  validation_file: str | None = flags.field(path=flags.PATH, help="TSV/CSV/JSON validation file")
  test_file: str | None = flags.field(
    path=flags.PATH, help="TSV/CSV/JSON test file (for --do_predict)"
  )
  max_seq_length: int = flags.field(
    128, type=flags.positive_int, help="tokens per example; longer ones are truncated"
  )
  max_train_samples: int | None = flags.max_samples("training")
  max_eval_samples: int | None = flags.max_samples("eval")
  max_predict_samples: int | None = flags.max_samples("test")


@dataclasses.dataclass
class GlueTraining(flags.TrainingConfig):
  do_predict: bool = flags.field(
    False, help="write predictions for the test split (--test_file, or the Hub's) to OUTPUT_DIR"
  )
  pack_sequences: bool = flags.field(
    True,
    help="padding-free batches: sequences share rows of max_seq_length tokens, attention "
    "masked to each sequence (same logits as padded rows, fewer tokens); --no-pack_sequences "
    "pads each batch to a bucketed length instead",
  )


@dataclasses.dataclass
class GlueLora(flags.LoraConfig):
  ignore_mismatched_sizes: bool = flags.field(
    False,
    help="with --adapter_name_or_path: keep this task's new classifier head when the saved one "
    "has another shape (e.g. an MNLI adapter, 3 labels, starting RTE)",
  )


@dataclasses.dataclass
class GlueConfig:
  """``run_glue.py``'s configuration: its flags, YAML keys and defaults."""

  model: GlueModelData = flags.group("model and data", GlueModelData())
  training: GlueTraining = flags.group(
    "training",
    GlueTraining(
      per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=5e-4,
      warmup_ratio=0.06, output_dir="outputs/glue",
    ),
  )  # fmt: skip
  lora: GlueLora = flags.group(
    "LoRA", GlueLora(lora_target_modules=["query", "value"], lora_dropout=0.1)
  )


def build_parser() -> flags.OneLineParser:
  """All flags, with their defaults (which a ``--config`` file then overrides)."""
  return flags.parser_for(
    GlueConfig(),
    "run_glue.py",
    "LoRA fine-tuning on a GLUE task with lora_jax (see train/run_glue.py).",
    fallback=f"{DEFAULT_MODEL}, or ",
  )


def _check(args: argparse.Namespace, parser: flags.OneLineParser) -> argparse.Namespace:
  """The shared checks (:func:`flags.check_shared`); ``--do_predict`` needs a test split."""
  flags.check_shared(args, parser, DEFAULT_MODEL)
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
