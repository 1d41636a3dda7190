"""Command-line flags every training script shares: their types, groups and checks.

Scripts build their parser from :func:`new_parser` and the groups here (:func:`add_model`,
:func:`add_training`, :func:`add_lora`), each with the script's own defaults, and read it with
:func:`train.cli.config_file.parse` (``--config FILE``, YAML). Nothing here imports jax: a bad
flag, or ``--help``, costs no startup. The lists of names offered as choices have one owner each:
the engine's in :mod:`train.engine.kinds`; the library's (:data:`QUANTIZE_KINDS`,
:data:`LORA_INITS`) are copies that ``tests/test_flag_faults.py`` compares with lora_jax's.
"""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any
from typing import NoReturn

from train.engine.kinds import DTYPES
from train.engine.kinds import PARALLEL_MODES

QUANTIZE_KINDS = ("nf4", "int8")  # lora_jax.Quantization's kinds (a test checks the copy)
# PEFT's names of lora_jax.LoraRule's inits (a test checks the copy): kaiming is kaiming_uniform
LORA_INITS = ("gaussian", "kaiming", "pissa", "pissa_niter_K", "olora")


class OneLineParser(argparse.ArgumentParser):
  """``ArgumentParser`` whose errors are one line (no usage block): ``prog: error: ...``."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message}\n")


PATH = "path"  # a file or folder
HUB_OR_PATH = "Hub id or path"  # a folder, or a Hugging Face Hub id ("org/name")


def _number(kind, name: str, ok):
  """An argparse ``type``: parses ``kind``; ``ok(value)`` False, or a float that is not finite
  (inf, nan) -> "invalid NAME value: 'x'".

  Example:
    >>> positive_float("2e-4"), unit_float("1")
    (0.0002, 1.0)
    >>> positive_float("inf")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: invalid positive float value: 'inf'
  """

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
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
percent_int = _number(int, "int in [0, 100)", lambda v: 0 <= v < 100)


def lora_init_kind(text: str) -> str:
  """``--init_lora_weights``: PEFT's names, as :class:`lora_jax.LoraRule`'s ``init`` spells them.

  Example:
    >>> lora_init_kind("kaiming"), lora_init_kind("pissa_niter_4"), lora_init_kind("olora")
    ('kaiming_uniform', 'pissa_niter_4', 'olora')
    >>> lora_init_kind("pissa_niter_0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: invalid choice: 'pissa_niter_0' (choose from gaussian, kaiming, ...
  """
  if text in ("gaussian", "pissa", "olora"):
    return text
  if text == "kaiming":
    return "kaiming_uniform"
  k = text.removeprefix("pissa_niter_")
  if k != text and k.isdigit() and int(k) > 0:
    return f"pissa_niter_{int(k)}"
  raise argparse.ArgumentTypeError(
    f"invalid choice: {text!r} (choose from gaussian, kaiming, pissa, pissa_niter_K "
    "(K a positive int), olora)"
  )


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """``--help`` shows each flag's default, once; no "(default: None)" for flags without one."""

  def _get_help_string(self, action: argparse.Action) -> str:
    if action.default is None:
      return action.help or ""
    return super()._get_help_string(action)


def mark_path(action: argparse.Action, kind: str = PATH) -> argparse.Action:
  """Marks the flag ``action`` (what ``add_argument`` returns) as naming a path (``kind``
  :data:`PATH`) or a Hub id or path (:data:`HUB_OR_PATH`): a relative value in a ``--config``
  YAML file is then relative to the YAML file's folder (see :func:`_config_argv`)."""
  action.path_kind = kind
  return action


def path_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
  """The parser's path flags: ``dest -> kind`` (:func:`mark_path`)."""
  return {a.dest: a.path_kind for a in parser._actions if hasattr(a, "path_kind")}


def new_parser(prog: str, description: str) -> OneLineParser:
  p = OneLineParser(prog=prog, description=description, formatter_class=_DefaultsHelpFormatter)
  p.add_argument(
    "--config",
    help="YAML file of flag values (keys = flag names); relative paths in it are relative to "
    "its folder",
  )
  return p


def add_model(g, default_model: str | None) -> None:
  """``--model_name_or_path``, ``--config_name``, ``--tokenizer_name``, ``--dtype``."""
  fallback = f"{default_model}, or " if default_model else ""
  for action in (
    g.add_argument(
      "--model_name_or_path",
      help=f"checkpoint folder or Hub id; if not given: {fallback}with --config_name a new "
      "model trained from scratch",
    ),
    g.add_argument(
      "--config_name",
      help="config.json, or a folder or Hub id holding one: train a new model with random "
      "weights from scratch (instead of --model_name_or_path)",
    ),
    g.add_argument(
      "--tokenizer_name",
      help="tokenizer folder or Hub id; if not given: --model_name_or_path, else --config_name",
    ),
  ):
    mark_path(action, HUB_OR_PATH)
  g.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")


def add_training(g, *, batch: int, eval_batch: int, learning_rate: float, warmup: float,
                 epochs: float, save_steps: int, output_dir: str) -> None:  # fmt: skip
  """Batch sizes, optimizer, schedule, lengths of the run, logging/eval/save, parallel mode."""
  g.add_argument(
    "--per_device_train_batch_size", type=positive_int, default=batch, help="training rows per step"
  )
  g.add_argument(
    "--per_device_eval_batch_size",
    type=positive_int,
    default=eval_batch,
    help="eval rows per batch",
  )
  g.add_argument(
    "--gradient_accumulation_steps",
    type=positive_int,
    default=1,
    help="batches summed into each optimizer step",
  )
  g.add_argument(
    "--learning_rate", type=positive_float, default=learning_rate, help="AdamW's peak rate"
  )
  g.add_argument("--weight_decay", type=nonneg_float, default=0.01, help="AdamW's weight decay")
  g.add_argument(
    "--warmup_ratio", type=unit_float, default=warmup, help="share of the steps spent warming up"
  )
  g.add_argument(
    "--num_train_epochs", type=positive_float, default=epochs, help="passes over the training data"
  )
  g.add_argument("--max_steps", type=nonneg_int, default=0, help="if > 0: overrides epochs")
  g.add_argument("--logging_steps", type=positive_int, default=10, help="log the loss every N")
  g.add_argument("--eval_steps", type=nonneg_int, default=0, help="0: evaluate at the end only")
  g.add_argument("--save_steps", type=nonneg_int, default=save_steps, help="0: at the end only")
  g.add_argument("--save_total_limit", type=nonneg_int, default=2, help="0: keep all")
  g.add_argument("--seed", type=int, default=42, help="weights, dropout and data order")
  mark_path(
    g.add_argument(
      "--output_dir",
      default=output_dir,
      help="metrics, checkpoints, adapter; rerunning with checkpoints here resumes",
    )
  )
  g.add_argument(
    "--export_merged",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="also write a merged Hugging Face checkpoint to OUTPUT_DIR/merged",
  )
  g.add_argument(
    "--parallel",
    choices=PARALLEL_MODES,
    default="none",
    help="one device, data parallel (pmap), or a device mesh",
  )
  g.add_argument(
    "--shard_frozen",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="--parallel mesh: shard the frozen base over the devices (FSDP-style) instead of "
    "replicating it",
  )
  g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm")


def add_lora(g, *, targets: list[str], dropout: float) -> None:
  """``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``, ... ."""
  g.add_argument("--lora_r", type=positive_int, default=8, help="adapter rank")
  g.add_argument(
    "--lora_alpha", type=positive_float, default=16.0, help="scale: alpha / r (rsLoRA: / sqrt r)"
  )
  g.add_argument(
    "--lora_dropout", type=dropout_float, default=dropout, help="dropout on the adapter's input"
  )
  g.add_argument(
    "--lora_target_modules",
    nargs="+",
    default=targets,
    help="PEFT-style module names, 'all-linear', or one regex over 'params/a/b/c' module paths",
  )
  g.add_argument(
    "--lora_rslora",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="rank-stabilised LoRA: scale by alpha / sqrt(r)",
  )
  g.add_argument(
    "--loraplus_lr_ratio",
    type=positive_float,
    help="LoRA+: the adapters' B factors learn at this times the learning rate (e.g. 16); "
    "if not given: plain LoRA",
  )
  g.add_argument(
    "--use_dora",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="DoRA: a trainable magnitude per output unit beside the low-rank direction update",
  )
  g.add_argument(
    "--init_lora_weights",
    type=lora_init_kind,
    default="gaussian",
    metavar="{" + ",".join(LORA_INITS) + "}",
    help="the adapters' start: A ~ N(0, 1/r^2) (gaussian) or Kaiming-uniform (PEFT's default), "
    "B zero; or PiSSA (top-r singular vectors of W; pissa_niter_K: randomized SVD with K "
    "iterations) or OLoRA (QR of W), which move that part of W into the adapter",
  )
  g.add_argument(
    "--quantize",
    choices=QUANTIZE_KINDS,
    help="QLoRA: the frozen linear weights in 4-bit NormalFloat (nf4, double-quantized "
    "absmaxes) or int8 (per output channel); if not given: the base stays in --dtype",
  )
  mark_path(
    g.add_argument(
      "--adapter_name_or_path", help="start from this adapter (ours or PEFT's): folder or Hub id"
    ),
    HUB_OR_PATH,
  )


def resolve_model(
  args: argparse.Namespace, parser: OneLineParser, default_model: str | None
) -> argparse.Namespace:
  """Fills ``model_name_or_path`` / ``tokenizer_name`` defaults; one model source or exit 2.

  Either ``--model_name_or_path`` (a checkpoint) or ``--config_name`` (a new model from scratch,
  as Hugging Face's ``run_mlm.py``); an empty value counts as not given.
  """
  model, config = args.model_name_or_path, args.config_name
  if model and config:
    parser.error(
      f"argument --config_name: not allowed with --model_name_or_path ({config!r} and "
      f"{model!r}): give a checkpoint, or a config to train a new model from scratch"
    )
  if model is None and not config:
    model = default_model
  if not model and not config:
    parser.error(
      f"argument --model_name_or_path: {'not given' if model is None else 'empty'}, and no "
      "--config_name: give a checkpoint folder or Hub id, or --config_name to train a new "
      "model from scratch"
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
