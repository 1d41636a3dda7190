"""Command-line flags every training script shares: their types, groups and checks.

Each flag is a field of a dataclass, written once: its type, default, choices and help
(:func:`field`). The shared groups are :class:`ModelConfig`, :class:`TrainingConfig` and
:class:`LoraConfig`; a script's configuration nests them (subclassed with its own flags) with its
own defaults (:func:`group`), and its parser, and so its ``--help`` and YAML keys, is generated
from that (:func:`parser_for`); parsed flags become the typed configuration with
:func:`to_config`. Scripts read the parser with
:func:`train.cli.config_file.parse` (``--config FILE``, YAML). Nothing here imports jax: a bad
flag, or ``--help``, costs no startup. The lists of names offered as choices have one owner each:
the engine's in :mod:`train.engine.kinds`; the library's (:data:`QUANTIZE_KINDS`,
:data:`LORA_INITS`) are copies that ``tests/test_flag_faults.py`` compares with lora_jax's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
from typing import Any
from typing import NoReturn

from train.engine.kinds import DTYPES
from train.engine.kinds import PARALLEL_MODES

QUANTIZE_KINDS = ("nf4", "int8")  # lora_jax.Quantization's kinds (a test checks the copy)
# lora_jax.LoraRule's inits (a test checks the copy)
LORA_INITS = ("gaussian", "kaiming_uniform", "pissa", "pissa_niter_K", "olora")
# --init_lora_weights's spellings: the names above, K shown as a placeholder, and kaiming, an
# alias of kaiming_uniform (the CLI's name before; PEFT's init_lora_weights=True)
LORA_INIT_METAVAR = "{gaussian,kaiming_uniform,kaiming,pissa,pissa_niter_<K>,olora}"
LORA_INIT_CHOICES = (
  "gaussian, kaiming_uniform (alias kaiming), pissa, pissa_niter_<K> (K a positive int), olora"
)


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
# numpy's seeds (jax's keys take more): refused here, not by numpy after the model loaded
seed_int = _number(int, "int in [0, 2**32 - 1]", lambda v: 0 <= v < 2**32)
# the step counter is an int32 of micro-batches (train.engine.state.TrainState.step)
MAX_STEPS = 2**31 - 1
steps_int = _number(int, "int in [0, 2**31 - 1]", lambda v: 0 <= v <= MAX_STEPS)
MAX_EPOCHS = 1e6  # --num_train_epochs (without --max_steps): more would overflow the counter


def output_folder(text: str) -> str:
  """``--output_dir``: not empty (an empty value would write into the current folder)."""
  if not text.strip():
    raise argparse.ArgumentTypeError(
      f"invalid folder: {text!r}: name the folder for the run's outputs (e.g. outputs/run1; "
      "'.' for the current folder)"
    )
  return text


def lora_init_kind(text: str) -> str:
  """``--init_lora_weights``: :class:`lora_jax.LoraRule`'s ``init`` names, and ``kaiming``
  (an alias of ``kaiming_uniform``).

  Example:
    >>> lora_init_kind("kaiming"), lora_init_kind("kaiming_uniform"), lora_init_kind("olora")
    ('kaiming_uniform', 'kaiming_uniform', 'olora')
    >>> lora_init_kind("pissa_niter_4")
    'pissa_niter_4'
    >>> lora_init_kind("pissa_niter_0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: invalid choice: 'pissa_niter_0' (choose from gaussian, ...
  """
  if text in ("gaussian", "pissa", "olora", "kaiming_uniform"):
    return text
  if text == "kaiming":
    return "kaiming_uniform"
  k = text.removeprefix("pissa_niter_")
  if k != text and k.isdigit() and int(k) > 0:
    return f"pissa_niter_{int(k)}"
  raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {LORA_INIT_CHOICES})")


def rewrites_base(init: str) -> bool:
  """Whether an ``--init_lora_weights`` kind (or a :class:`lora_jax.LoraSpec`'s ``init``) moves
  part of the base weight into the adapter: PiSSA (and its fast variant) and OLoRA, which no
  quantized base, adapter bank or second adapter over the same base can share.

  Example:
    >>> rewrites_base("pissa_niter_4"), rewrites_base("olora"), rewrites_base("gaussian")
    (True, True, False)
  """
  return init.startswith(("pissa", "olora"))


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


# ---------------------------------------------------------------------------------------------
# Typed configuration: each flag is a dataclass field, written once (type, default, choices,
# help); a script's configuration nests groups of them, and its parser and YAML keys are
# generated from it (:func:`parser_for`).


def field(default: Any = None, *, help: str, type=None, choices=None, path: str | None = None,
          metavar: str | None = None) -> Any:  # fmt: skip
  """A flag: a dataclass field whose metadata holds what argparse needs.

  ``type`` parses the text (default: the text itself); a field annotated ``bool`` (or
  ``bool | None``) is an on/off flag (``--x`` / ``--no-x``), one annotated ``list[str]`` takes
  one or more values. ``path`` marks the flag as naming a path (:func:`mark_path`).
  """
  meta = {"help": help, "type": type, "choices": choices, "path": path, "metavar": metavar}
  if isinstance(default, list):
    return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
  return dataclasses.field(default=default, metadata=meta)


def group(title: str, defaults: Any) -> Any:
  """A group of flags titled ``title`` in ``--help``: the dataclass instance ``defaults`` gives
  its fields and this script's defaults for them."""
  return dataclasses.field(
    default_factory=lambda: dataclasses.replace(defaults), metadata={"title": title}
  )


def add_fields(g, defaults: Any, notes: dict[str, str]) -> None:
  """One flag per field of the dataclass instance ``defaults``, its value the default; help
  texts are formatted with ``notes`` (e.g. ``{fallback}``)."""
  for f in dataclasses.fields(defaults):
    meta, default = f.metadata, getattr(defaults, f.name)
    kwargs: dict[str, Any] = {"default": default, "help": meta["help"].format(**notes)}
    if f.type in ("bool", "bool | None"):
      kwargs["action"] = argparse.BooleanOptionalAction
    elif f.type == "list[str]":
      kwargs["nargs"] = "+"
    for key in ("type", "choices", "metavar"):
      if meta[key] is not None:
        kwargs[key] = meta[key]
    action = g.add_argument(f"--{f.name}", **kwargs)
    if meta["path"]:
      mark_path(action, meta["path"])


def parser_for(config: Any, prog: str, description: str, **notes: str) -> OneLineParser:
  """The parser of a script's configuration ``config`` (a dataclass instance of :func:`group`
  fields): ``--config``, then each group's flags.

  Example:
    >>> @dataclasses.dataclass
    ... class Demo:
    ...   lora: LoraConfig = group("LoRA", LoraConfig(lora_r=4))
    >>> args = parser_for(Demo(), "demo", "a demo").parse_args(["--lora_alpha", "8"])
    >>> args.lora_r, args.lora_alpha, to_config(Demo, args).lora.lora_alpha
    (4, 8.0, 8.0)
  """
  p = new_parser(prog, description)
  for f in dataclasses.fields(config):
    add_fields(p.add_argument_group(f.metadata["title"]), getattr(config, f.name), notes)
  return p


def to_config(cls: type, args: argparse.Namespace) -> Any:
  """The parsed flags ``args`` as the nested configuration ``cls`` (groups of fields)."""
  groups = {}
  for f in dataclasses.fields(cls):
    inner = type(f.default_factory())
    groups[f.name] = inner(**{g.name: getattr(args, g.name) for g in dataclasses.fields(inner)})
  return cls(**groups)


def max_samples(rows: str) -> Any:
  """``--max_{train,eval,predict}_samples``: keep the first N ``rows`` rows."""
  return field(type=positive_int, help=f"keep the first N {rows} rows")


# --attn_implementation: "auto", then lora_jax.models.layers.attention.ATTENTION_IMPLEMENTATIONS
# but None: a copy, so parsing flags imports no jax (tests/test_flag_faults.py checks it against
# the library's)
ATTENTION = ("auto", "xla", "xla_chunked", "cudnn", "pallas", "pallas_interpret")


@dataclasses.dataclass
class ModelConfig:
  """``--model_name_or_path``, ``--config_name``, ``--tokenizer_name``, ``--dtype``,
  ``--attn_implementation``."""

  model_name_or_path: str | None = field(
    help="checkpoint folder or Hub id; if not given: {fallback}with --config_name a new model "
    "trained from scratch",
    path=HUB_OR_PATH,
  )
  config_name: str | None = field(
    help="config.json, or a folder or Hub id holding one: train a new model with random "
    "weights from scratch (instead of --model_name_or_path)",
    path=HUB_OR_PATH,
  )
  tokenizer_name: str | None = field(
    help="tokenizer folder or Hub id; if not given: --model_name_or_path, else --config_name",
    path=HUB_OR_PATH,
  )
  dtype: str = field("float32", choices=DTYPES, help="compute dtype")
  bf16: bool = field(False, help="transformers' flag: the same as --dtype bfloat16")
  fp16: bool = field(
    False, help="transformers' flag: not supported (no float16 compute here); use --bf16"
  )
  attn_implementation: str = field(
    "auto",
    choices=ATTENTION,
    help="auto: cuDNN's fused kernel on GPU for bf16/fp16, else XLA's (on every platform but "
    "GPUs: XLA's); xla_chunked: XLA's, 512 queries at a time (long sequences without whole "
    "[seq, seq] scores); pallas: Pallas's fused kernel from segment ids (packed rows without a "
    "dense mask; causal in decoders, bidirectional in encoders), Triton on GPUs, Mosaic on "
    "TPUs, XLA elsewhere; pallas_interpret: the Triton kernel interpreted by JAX on any backend "
    "(slow: for tests)",
  )


@dataclasses.dataclass
class TrainingConfig:
  """Batch sizes, optimizer, schedule, lengths of the run, logging/eval/save, parallel mode."""

  per_device_train_batch_size: int = field(8, type=positive_int, help="training rows per step")
  per_device_eval_batch_size: int = field(8, type=positive_int, help="eval rows per batch")
  gradient_accumulation_steps: int = field(
    1, type=positive_int, help="batches summed into each optimizer step"
  )
  learning_rate: float = field(2e-4, type=positive_float, help="AdamW's peak rate")
  weight_decay: float = field(0.01, type=nonneg_float, help="AdamW's weight decay")
  warmup_ratio: float = field(0.0, type=unit_float, help="share of the steps spent warming up")
  num_train_epochs: float = field(3.0, type=positive_float, help="passes over the training data")
  max_steps: int = field(0, type=steps_int, help="if > 0: overrides epochs")
  logging_steps: int = field(10, type=positive_int, help="log the loss every N")
  eval_steps: int = field(0, type=nonneg_int, help="0: evaluate at the end only")
  save_steps: int = field(500, type=nonneg_int, help="0: at the end only")
  save_total_limit: int = field(2, type=nonneg_int, help="0: keep all")
  seed: int = field(42, type=seed_int, help="weights, dropout and data order")
  output_dir: str = field(
    "outputs",
    type=output_folder,
    path=PATH,
    help="metrics, checkpoints, adapter; rerunning with checkpoints here resumes",
  )
  overwrite_output_dir: bool = field(
    False,
    help="delete the run in OUTPUT_DIR and start over; without it, a rerun there with other "
    "settings is refused (the same settings resume)",
  )
  export_merged: bool = field(
    False, help="also write a merged Hugging Face checkpoint to OUTPUT_DIR/merged"
  )
  parallel: str = field(
    "none", choices=PARALLEL_MODES, help="one device, data parallel (pmap), or a device mesh"
  )
  shard_frozen: bool = field(
    False,
    help="--parallel mesh: shard the frozen base over the devices (FSDP-style) instead of "
    "replicating it",
  )
  progress: bool = field(True, help="tqdm")
  distributed_timeout: int = field(
    300,
    type=positive_int,
    help="multi-process jobs: seconds to reach the coordinator (JAX_COORDINATOR_ADDRESS), for "
    "all processes to join (jax.distributed.initialize's initialization_timeout), and after "
    "which a process not heard from counts as lost (the others stop with one line, exit 1)",
  )


@dataclasses.dataclass
class LoraConfig:
  """``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--lora_target_modules``, ... ."""

  lora_r: int = field(8, type=positive_int, help="adapter rank")
  lora_alpha: float = field(16.0, type=positive_float, help="scale: alpha / r (rsLoRA: / sqrt r)")
  lora_dropout: float = field(0.0, type=dropout_float, help="dropout on the adapter's input")
  lora_target_modules: list[str] = field(
    ["all-linear"],
    help="PEFT-style module names, 'all-linear', or one regex over 'params/a/b/c' module paths",
  )
  lora_rslora: bool = field(False, help="rank-stabilised LoRA: scale by alpha / sqrt(r)")
  loraplus_lr_ratio: float | None = field(
    type=positive_float,
    help="LoRA+: the adapters' B factors learn at this times the learning rate (e.g. 16); "
    "if not given: plain LoRA",
  )
  use_dora: bool = field(
    False,
    help="DoRA: a trainable magnitude per output unit beside the low-rank direction update",
  )
  init_lora_weights: str = field(
    "gaussian",
    type=lora_init_kind,
    metavar=LORA_INIT_METAVAR,
    help="the adapters' start: A ~ N(0, 1/r^2) (gaussian) or Kaiming-uniform (kaiming_uniform, "
    "alias kaiming: PEFT's default), B zero; or PiSSA (top-r singular vectors of W; "
    "pissa_niter_<K>, e.g. pissa_niter_4: randomized SVD with K iterations) or OLoRA (QR of "
    "W), which move that part of W into the adapter",
  )
  quantize: str | None = field(
    choices=QUANTIZE_KINDS,
    help="QLoRA: the frozen linear weights in 4-bit NormalFloat (nf4, double-quantized "
    "absmaxes) or int8 (per output channel); if not given: the base stays in --dtype",
  )
  adapter_name_or_path: str | None = field(
    path=HUB_OR_PATH, help="start from this adapter (ours or PEFT's): folder or Hub id"
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


def check_shared(
  args: argparse.Namespace, parser: OneLineParser, default_model: str | None
) -> argparse.Namespace:
  """The shared groups' checks across flags: the model source (:func:`resolve_model`),
  transformers' ``--bf16`` (``--dtype bfloat16``) and ``--fp16`` (refused), and a run that fits
  the step counter. Exit 2 with one line on a bad combination."""
  resolve_model(args, parser, default_model)
  if args.fp16:
    parser.error(
      f"argument --fp16: float16 compute is not supported (--dtype choices: {', '.join(DTYPES)}); "
      "use --bf16 (or --dtype bfloat16)"
    )
  if args.bf16:
    args.dtype = "bfloat16"
  if not args.max_steps and args.num_train_epochs > MAX_EPOCHS:
    parser.error(
      f"argument --num_train_epochs: {args.num_train_epochs:g} epochs is over the most, "
      f"{MAX_EPOCHS:g}: give a float in (0, {MAX_EPOCHS:g}], or --max_steps"
    )
  micro = args.max_steps * args.gradient_accumulation_steps
  if micro > MAX_STEPS:
    parser.error(
      f"argument --max_steps: {args.max_steps} steps of {args.gradient_accumulation_steps} "
      f"accumulated batches are {micro} batches, over the step counter's {MAX_STEPS}; lower "
      "--max_steps or --gradient_accumulation_steps"
    )
  return args


def as_dict(args: argparse.Namespace) -> dict[str, Any]:
  """The flags as a JSON-friendly dict (written beside the outputs)."""
  return {k: v for k, v in sorted(vars(args).items())}
