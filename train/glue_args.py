"""Command-line flags of ``train/run_glue.py``, Hugging Face ``run_glue.py`` style, plus YAML.

``--config FILE`` names a YAML mapping whose keys are flag names (without ``--``). Its values
become flags placed *before* the command line, so the command line overrides the file and every
value goes through the same parsing and checks (``choices``, positive numbers, ...). A bad value,
from the file or the command line, ends the program with one line naming the flag, the value and
the valid choices, and exit status 2.

Example:
  >>> args = parse_args(["--task_name", "sst2", "--model_name_or_path", "m", "--lora_r", "4"])
  >>> args.lora_r, args.lora_alpha, args.parallel
  (4, 16.0, 'none')
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence
from typing import Any
from typing import NoReturn

import yaml

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
PARALLEL_MODES = ("none", "pmap", "mesh")
DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL = "roberta-base"  # --model_name_or_path when neither it nor --config_name is given


class OneLineParser(argparse.ArgumentParser):
  """``ArgumentParser`` whose errors are one line (no usage block): ``prog: error: ...``."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind, name: str, ok):
  """An argparse ``type``: parses ``kind``; ``ok(value)`` False -> "invalid NAME value: 'x'"."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not ok(value):
      raise argparse.ArgumentTypeError(f"invalid {name} value: {text!r}")
    return value

  parse.__name__ = name
  return parse


positive_int = _number(int, "positive int", lambda v: v > 0)
nonneg_int = _number(int, "non-negative int", lambda v: v >= 0)
positive_float = _number(float, "positive float", lambda v: v > 0)
nonneg_float = _number(float, "non-negative float", lambda v: v >= 0)
unit_float = _number(float, "float in [0, 1]", lambda v: 0 <= v <= 1)
dropout_float = _number(float, "float in [0, 1)", lambda v: 0 <= v < 1)


def build_parser() -> OneLineParser:
  """All flags, with their defaults (which a ``--config`` file then overrides)."""
  p = OneLineParser(
    prog="run_glue.py",
    description="LoRA fine-tuning on a GLUE task with lora_jax (see train/run_glue.py).",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--config", help="YAML file of flag values (keys = flag names)")
  g = p.add_argument_group("model and data")
  g.add_argument(
    "--model_name_or_path",
    help=f"checkpoint folder or Hub id; if not given: {DEFAULT_MODEL}, or with --config_name a "
    "new model trained from scratch",
  )
  g.add_argument(
    "--config_name",
    help="config.json, or a folder or Hub id holding one: train a new model with random "
    "weights from scratch (instead of --model_name_or_path)",
  )
  g.add_argument(
    "--tokenizer_name",
    help="tokenizer folder or Hub id; if not given: --model_name_or_path, else --config_name",
  )
  g.add_argument("--task_name", choices=GLUE_TASKS, default="sst2")
  g.add_argument("--train_file", help="TSV/CSV/JSON training file (default: the Hub's GLUE)")
  g.add_argument("--validation_file", help="TSV/CSV/JSON validation file")
  g.add_argument("--test_file", help="TSV/CSV/JSON test file (for --do_predict)")
  g.add_argument("--max_seq_length", type=positive_int, default=128)
  g.add_argument("--max_train_samples", type=positive_int, help="keep the first N training rows")
  g.add_argument("--max_eval_samples", type=positive_int, help="keep the first N eval rows")
  g.add_argument("--max_predict_samples", type=positive_int, help="keep the first N test rows")
  g.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
  g = p.add_argument_group("training")
  g.add_argument("--per_device_train_batch_size", type=positive_int, default=32)
  g.add_argument("--per_device_eval_batch_size", type=positive_int, default=64)
  g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
  g.add_argument("--learning_rate", type=positive_float, default=5e-4)
  g.add_argument("--weight_decay", type=nonneg_float, default=0.01)
  g.add_argument("--warmup_ratio", type=unit_float, default=0.06)
  g.add_argument("--num_train_epochs", type=positive_float, default=3.0)
  g.add_argument("--max_steps", type=nonneg_int, default=0, help="if > 0: overrides epochs")
  g.add_argument("--logging_steps", type=positive_int, default=10)
  g.add_argument("--eval_steps", type=nonneg_int, default=0, help="0: evaluate at the end only")
  g.add_argument("--save_steps", type=nonneg_int, default=500, help="0: save at the end only")
  g.add_argument("--save_total_limit", type=nonneg_int, default=2, help="0: keep all")
  g.add_argument("--seed", type=int, default=42)
  g.add_argument("--output_dir", default="outputs/glue")
  g.add_argument("--do_predict", action=argparse.BooleanOptionalAction, default=False)
  g.add_argument(
    "--export_merged",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="also write a merged Hugging Face checkpoint to OUTPUT_DIR/merged",
  )
  g.add_argument(
    "--pack_sequences",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="padding-free batches: sequences share rows of max_seq_length tokens, attention "
    "masked to each sequence (same logits as padded rows, fewer tokens); --no-pack_sequences "
    "pads each batch to a bucketed length instead",
  )
  g.add_argument("--parallel", choices=PARALLEL_MODES, default="none")
  g.add_argument(
    "--shard_frozen",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="--parallel mesh: shard the frozen base over the devices (FSDP-style) instead of "
    "replicating it",
  )
  g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm")
  g = p.add_argument_group("LoRA")
  g.add_argument("--lora_r", type=positive_int, default=8)
  g.add_argument("--lora_alpha", type=positive_float, default=16.0)
  g.add_argument("--lora_dropout", type=dropout_float, default=0.1)
  g.add_argument(
    "--lora_target_modules",
    nargs="+",
    default=["query", "value"],
    help="PEFT-style module names, 'all-linear', or one regex over 'params/a/b/c' module paths",
  )
  g.add_argument("--lora_rslora", action=argparse.BooleanOptionalAction, default=False)
  g.add_argument("--adapter_name_or_path", help="start from this adapter (ours or PEFT's)")
  g.add_argument(
    "--ignore_mismatched_sizes",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="with --adapter_name_or_path: keep this task's new classifier head when the saved one "
    "has another shape (e.g. an MNLI adapter, 3 labels, starting RTE)",
  )
  return p


def _config_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
  """YAML as flags: ``{lora_r: 8, do_predict: true}`` -> ``--lora_r 8 --do_predict``."""
  try:
    data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
  except OSError as e:
    parser.error(f"argument --config: cannot read {path!r}: {e.strerror}")
  except yaml.YAMLError as e:
    parser.error(f"argument --config: {path!r} is not valid YAML: {str(e).splitlines()[0]}")
  if not isinstance(data, dict):
    parser.error(f"argument --config: {path!r} must hold a mapping of flag names to values")
  actions = {a.dest: a for a in parser._actions if a.option_strings}
  unknown = sorted(set(map(str, data)) - set(actions) - {"config"})
  if unknown:
    parser.error(
      f"argument --config: {path!r} has unknown keys {unknown}; valid keys: {sorted(actions)}"
    )
  argv: list[str] = []
  for key, value in data.items():
    flag = f"--{key}"
    if isinstance(actions[key], argparse.BooleanOptionalAction):
      if not isinstance(value, bool):
        parser.error(f"argument --config: {key}={value!r} in {path!r} must be true or false")
      argv.append(flag if value else f"--no-{key}")
    elif value is None:
      continue
    elif isinstance(value, list):
      argv += [flag, *map(str, value)]
    else:
      argv += [flag, str(value)]
  return argv


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Flags from ``--config`` (if any), then from ``argv`` (default ``sys.argv[1:]``)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--config")
  known, _ = pre.parse_known_args(argv)
  if known.config:
    argv = _config_argv(known.config, parser) + argv
  return _resolve_model(parser.parse_args(argv), parser)


def _resolve_model(args: argparse.Namespace, parser: OneLineParser) -> argparse.Namespace:
  """Fills ``model_name_or_path`` / ``tokenizer_name`` defaults; one model source or exit 2.

  Either ``--model_name_or_path`` (a checkpoint) or ``--config_name`` (a new model from scratch,
  as Hugging Face's ``run_mlm.py``); an empty value counts as not given.

  Example:
    >>> args = parse_args(["--config_name", "configs/quickstart"])
    >>> args.model_name_or_path, args.tokenizer_name
    (None, 'configs/quickstart')
  """
  model, config = args.model_name_or_path, args.config_name
  if model and config:
    parser.error(
      f"argument --config_name: not allowed with --model_name_or_path ({config!r} and "
      f"{model!r}): give a checkpoint, or a config to train a new model from scratch"
    )
  if model is None and not config:
    model = DEFAULT_MODEL
  if not model and not config:
    parser.error(
      "argument --model_name_or_path: empty, and no --config_name: give a checkpoint folder "
      "or Hub id, or --config_name to train a new model from scratch"
    )
  args.model_name_or_path = model or None
  args.config_name = config or None
  if not args.tokenizer_name:
    if not model and pathlib.Path(config).is_file():
      parser.error(
        f"argument --tokenizer_name: required when --config_name is a file ({config!r}); "
        "name the tokenizer's folder or Hub id"
      )
    args.tokenizer_name = model or config
  return args


def as_dict(args: argparse.Namespace) -> dict[str, Any]:
  """The flags as a JSON-friendly dict (written beside the outputs)."""
  return {k: v for k, v in sorted(vars(args).items())}
