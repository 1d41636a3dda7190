"""Command-line flags of ``train/run_clm.py``: transformers' ``run_clm.py`` and TRL's SFT config
names, plus LoRA's and ``--config FILE`` (YAML; see :mod:`train.cli.config_file`).

Example:
  >>> args = parse_args(["--model_name_or_path", "m", "--train_file", "t.jsonl"])
  >>> args.lora_target_modules, args.packing, args.lr_scheduler_type, args.max_grad_norm
  (['all-linear'], True, 'linear', 1.0)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from train.cli import config_file
from train.cli import flags
from train.engine.kinds import LR_SCHEDULERS

# "auto", then lora_jax.models.layers.attention.ATTENTION_IMPLEMENTATIONS but None: a copy, so
# parsing flags imports no jax (tests/test_flag_faults.py checks it against the library's)
ATTENTION = ("auto", "xla", "xla_chunked", "cudnn", "pallas", "pallas_interpret")


def build_parser() -> flags.OneLineParser:
  """All flags, with their defaults (which a ``--config`` file then overrides)."""
  p = flags.new_parser(
    "run_clm.py",
    "LoRA supervised fine-tuning of a causal LM with lora_jax (see train/run_clm.py).",
  )
  g = p.add_argument_group("model")
  flags.add_model(g, None)
  g.add_argument(
    "--scan_layers",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="run the decoder layers under nn.scan (one layer compiled, however deep)",
  )
  g.add_argument(
    "--remat",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="rematerialise each layer in the backward pass (less memory, more compute)",
  )
  g.add_argument(
    "--attn_implementation",
    default="auto",
    choices=ATTENTION,
    help="auto: cuDNN's fused kernel on GPU for bf16/fp16, else XLA's; xla_chunked: XLA's, "
    "512 queries at a time (long sequences without whole [seq, seq] scores); pallas: "
    "Pallas's fused kernel from segment ids (packed rows without a dense mask), Triton on "
    "GPUs, Mosaic on TPUs, XLA elsewhere; pallas_interpret: the Triton kernel interpreted by "
    "JAX on any backend (slow: for tests)",
  )
  g = p.add_argument_group("data")
  flags.mark_path(
    g.add_argument(
      "--dataset_name", help="a Hub dataset or a local folder (datasets.load_dataset)"
    ),
    flags.HUB_OR_PATH,
  )
  g.add_argument("--dataset_config_name", help="the Hub dataset's configuration")
  flags.mark_path(
    g.add_argument("--train_file", help="JSON, JSONL, CSV, parquet or .txt training file")
  )
  flags.mark_path(g.add_argument("--validation_file", help="validation file, same formats"))
  g.add_argument(
    "--validation_split_percentage",
    type=flags.percent_int,
    default=5,
    help="without a validation split: hold out this %% of the training rows",
  )
  g.add_argument(
    "--text_column",
    help="plain-text column (language modelling); default: 'text' when there is no "
    "conversation column",
  )
  g.add_argument(
    "--messages_column",
    help="conversation column (lists of role/content turns, formatted with the tokenizer's "
    "chat template); default: 'messages' if present",
  )
  g.add_argument(
    "--completion_only_loss",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="loss on the assistant replies only (default: on for conversations, off for text)",
  )
  g.add_argument(
    "--max_seq_length",
    type=flags.positive_int,
    default=512,
    help="tokens per row; longer sequences are truncated",
  )
  g.add_argument(
    "--packing",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="padding-free rows of max_seq_length tokens holding several sequences (segment_ids); "
    "--no-packing: one sequence per row, padded to a bucketed length",
  )
  g.add_argument(
    "--max_train_samples", type=flags.positive_int, help="keep the first N training rows"
  )
  g.add_argument("--max_eval_samples", type=flags.positive_int, help="keep the first N eval rows")
  g = p.add_argument_group("training")
  flags.add_training(
    g, batch=8, eval_batch=8, learning_rate=2e-4, warmup=0.0, epochs=3.0, save_steps=500,
    output_dir="outputs/clm",
  )  # fmt: skip
  g.add_argument(
    "--lr_scheduler_type",
    choices=LR_SCHEDULERS,
    default="linear",
    help="the learning rate's decay after warmup",
  )
  g.add_argument(
    "--eval_on_start",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="also evaluate (and sample) before the first step: the untuned model's scores",
  )
  g.add_argument(
    "--max_grad_norm", type=flags.nonneg_float, default=1.0, help="0: no gradient clipping"
  )
  g = p.add_argument_group("generation")
  generation_prompts_file = g.add_argument(
    "--generation_prompts_file",
    help="prompts to sample at every evaluation and at the end (one per line, or JSONL with a "
    "'prompt' field and optionally the expected 'completion', scored as samples_exact_match); "
    "written to OUTPUT_DIR/samples.jsonl",
  )
  flags.mark_path(generation_prompts_file)
  g.add_argument(
    "--generation_max_new_tokens",
    type=flags.positive_int,
    default=64,
    help="most tokens generated per sample (greedy decoding)",
  )
  g = p.add_argument_group("LoRA")
  flags.add_lora(g, targets=["all-linear"], dropout=0.05)
  return p


def _check(args: argparse.Namespace, parser: flags.OneLineParser) -> argparse.Namespace:
  flags.resolve_model(args, parser, None)
  if not args.dataset_name and not args.train_file:
    parser.error("argument --train_file: give a training file or --dataset_name (Hub)")
  return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Flags from ``--config`` (if any), then from ``argv`` (default ``sys.argv[1:]``)."""
  return config_file.parse(build_parser(), argv, _check)
