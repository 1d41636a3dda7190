"""Command-line flags of ``train/run_clm.py``: transformers' ``run_clm.py`` and TRL's SFT config
names, plus LoRA's and ``--config FILE`` (YAML; see :mod:`train.cli.config_file`).

Example:
  >>> args = parse_args(["--model_name_or_path", "m", "--train_file", "t.jsonl"])
  >>> args.lora_target_modules, args.packing, args.lr_scheduler_type, args.max_grad_norm
  (['all-linear'], True, 'linear', 1.0)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from train.cli import config_file
from train.cli import flags
from train.engine.kinds import LR_SCHEDULERS


@dataclasses.dataclass
class ClmModel(flags.ModelConfig):
  """The model (:class:`train.cli.flags.ModelConfig`), and how the decoder runs."""

  scan_layers: bool = flags.field(
    False, help="run the decoder layers under nn.scan (one layer compiled, however deep)"
  )
  remat: bool = flags.field(
    False, help="rematerialise each layer in the backward pass (less memory, more compute)"
  )


@dataclasses.dataclass
class ClmData:
  dataset_name: str | None = flags.field(
    path=flags.HUB_OR_PATH, help="a Hub dataset or a local folder (datasets.load_dataset)"
  )
  dataset_config_name: str | None = flags.field(help="the Hub dataset's configuration")
  train_file: str | None = flags.field(
    path=flags.PATH, help="JSON, JSONL, CSV, parquet or .txt training file"
  )
  validation_file: str | None = flags.field(path=flags.PATH, help="validation file, same formats")
  validation_split_percentage: int = flags.field(
    5,
    type=flags.percent_int,
    help="without a validation split: hold out this %% of the training rows",
  )
  text_column: str | None = flags.field(
    help="plain-text column (language modelling); default: 'text' when there is no "
    "conversation column",
  )
  messages_column: str | None = flags.field(
    help="conversation column (lists of role/content turns, formatted with the tokenizer's "
    "chat template); default: 'messages' if present",
  )
  completion_only_loss: bool | None = flags.field(
    help="loss on the assistant replies only (default: on for conversations, off for text)"
  )
  max_seq_length: int = flags.field(
    512, type=flags.positive_int, help="tokens per row; longer sequences are truncated"
  )
  packing: bool = flags.field(
    True,
    help="padding-free rows of max_seq_length tokens holding several sequences (segment_ids); "
    "--no-packing: one sequence per row, padded to a bucketed length",
  )
  adapter_column: str | None = flags.field(
    help="train several adapters at once: one per name in this column of the training data, "
    "each example training its own (a packed row holds one adapter's examples), one adapter "
    "bank over the base; each is written to OUTPUT_DIR/adapter/NAME and its eval loss reported "
    "as eval_loss_NAME (a .jsonl --generation_prompts_file then names each prompt's adapter in "
    "the same field)"
  )
  max_train_samples: int | None = flags.max_samples("training")
  max_eval_samples: int | None = flags.max_samples("eval")


@dataclasses.dataclass
class ClmTraining(flags.TrainingConfig):
  lr_scheduler_type: str = flags.field(
    "linear", choices=LR_SCHEDULERS, help="the learning rate's decay after warmup"
  )
  eval_on_start: bool = flags.field(
    False, help="also evaluate (and sample) before the first step: the untuned model's scores"
  )
  max_grad_norm: float = flags.field(1.0, type=flags.nonneg_float, help="0: no gradient clipping")


@dataclasses.dataclass
class Generation:
  generation_prompts_file: str | None = flags.field(
    path=flags.PATH,
    help="prompts to sample at every evaluation and at the end (one per line, or JSONL with a "
    "'prompt' field and optionally the expected 'completion', scored as samples_exact_match); "
    "written to OUTPUT_DIR/samples.jsonl",
  )
  generation_max_new_tokens: int = flags.field(
    64, type=flags.positive_int, help="most tokens generated per sample (greedy decoding)"
  )


@dataclasses.dataclass
class ClmConfig:
  """``run_clm.py``'s configuration: its flags, YAML keys and defaults."""

  model: ClmModel = flags.group("model", ClmModel())
  data: ClmData = flags.group("data", ClmData())
  training: ClmTraining = flags.group("training", ClmTraining(output_dir="outputs/clm"))
  generation: Generation = flags.group("generation", Generation())
  lora: flags.LoraConfig = flags.group("LoRA", flags.LoraConfig(lora_dropout=0.05))


def build_parser() -> flags.OneLineParser:
  """All flags, with their defaults (which a ``--config`` file then overrides)."""
  return flags.parser_for(
    ClmConfig(),
    "run_clm.py",
    "LoRA supervised fine-tuning of a causal LM with lora_jax (see train/run_clm.py).",
    fallback="",
  )


def _check(args: argparse.Namespace, parser: flags.OneLineParser) -> argparse.Namespace:
  flags.check_shared(args, parser, None)
  if not args.dataset_name and not args.train_file:
    parser.error("argument --train_file: give a training file or --dataset_name (Hub)")
  if args.adapter_column:
    # what one adapter bank over one base cannot hold, or what the run would not know to write
    for flag, refused, why in (
      ("--adapter_name_or_path", args.adapter_name_or_path, "the bank's adapters start new"),
      ("--use_dora", args.use_dora, "a bank holds plain LoRA adapters"),
      ("--init_lora_weights", flags.rewrites_base(args.init_lora_weights),
       "PiSSA and OLoRA rewrite the base, which a bank's adapters share"),
      ("--export_merged", args.export_merged, "one merged model per adapter is not written"),
    ):  # fmt: skip
      if refused:
        parser.error(f"argument {flag}: not with --adapter_column: {why}")
  return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Flags from ``--config`` (if any), then from ``argv`` (default ``sys.argv[1:]``)."""
  return config_file.parse(build_parser(), argv, _check)
