"""Model and adapter setup every task shares: where the base comes from, LoRA from flags,
adapters from a path, what a checkpoint must agree on (:func:`signature`), and the exports a run
leaves (PEFT adapter, merged model, the random base of a model trained from scratch)."""

from __future__ import annotations

import argparse
import collections
import logging
import os
import pathlib
import zlib
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

import lora_jax
from lora_jax import models
from train.cli import flags
from train.engine.errors import first_line
from train.engine.state import jnp_dtype

logger = logging.getLogger(__name__)
_REGEX_CHARS = set("*+?[](){}|^$\\")
T = TypeVar("T")


def lora_targets(values: list[str]) -> str | tuple[str, ...]:
  """``--lora_target_modules``: one regex (if it has regex syntax), ``all-linear``, or names.

  Example:
    >>> lora_targets(["query", "value"]), lora_targets([".*/attention/self/(query|key)"])
    (('query', 'value'), '.*/attention/self/(query|key)')
  """
  if len(values) == 1 and (values[0] == "all-linear" or _REGEX_CHARS & set(values[0])):
    return values[0]
  return tuple(values)


def lora_rule(args: argparse.Namespace, exclude: str | None = None) -> lora_jax.LoraRule:
  """The ``--lora_*`` flags as a rule; ``exclude``: modules never adapted (e.g. a head)."""
  return lora_jax.LoraRule(
    lora_targets(args.lora_target_modules),
    rank=args.lora_r,
    alpha=args.lora_alpha,
    dropout=args.lora_dropout,
    rslora=args.lora_rslora,
    init=args.init_lora_weights,
    use_dora=args.use_dora,
    exclude=exclude,
  )


def quantization(args: argparse.Namespace, exclude: str | None = None):
  """``--quantize``: QLoRA's frozen base, every linear kernel but ``exclude`` (e.g. a head that
  trains whole) and the ``lm_head``; None without the flag."""
  if not args.quantize:
    return None
  if flags.rewrites_base(args.init_lora_weights):
    raise ValueError(
      f"--quantize {args.quantize} with --init_lora_weights {args.init_lora_weights} is not "
      "supported: that start rewrites the float weights the checkpoint is quantized from"
    )
  return lora_jax.Quantization("all-linear", kind=args.quantize, exclude=exclude)


def from_source(flag: str, name: str, load: Callable[[str], T]) -> T:
  """``load(name)`` for a local path or a Hub id, with one-line errors naming ``flag``.

  A name that looks like a path (``/``, ``.``, ``~``, or it exists) and does not exist is
  refused at once; a Hub id that cannot be fetched (no network, no such repo) says so, and how
  to run offline.

  Example:
    >>> from_source("--model_name_or_path", "./no/such/dir", print)
    Traceback (most recent call last):
    ...
    FileNotFoundError: --model_name_or_path './no/such/dir' does not exist (no such folder)
  """
  path = pathlib.Path(name).expanduser()
  local = name.startswith(("/", ".", "~")) or path.exists()
  if local and not path.exists():
    raise FileNotFoundError(f"{flag} {name!r} does not exist (no such folder)")
  try:
    return load(name)
  except OSError as e:  # transformers and huggingface_hub raise OSError subclasses
    why = first_line(e)
    if local:
      raise FileNotFoundError(f"{flag} {name!r}: {why}") from None
    hint = (
      "it is not in the local Hub cache (HF_HUB_OFFLINE is set)"
      if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
      else "set HF_HUB_OFFLINE=1 to use models already in the Hub cache"
    )
    raise FileNotFoundError(
      f"{flag} {name!r} is not a local folder, and the Hugging Face Hub could not provide it "
      f"({why}); name a local checkpoint folder, or {hint}"
    ) from None


def load_tokenizer(args: argparse.Namespace):
  """The tokenizer of ``--tokenizer_name`` (by default the model's folder or Hub id)."""
  import transformers

  flag = "--tokenizer_name"
  if args.tokenizer_name in (args.model_name_or_path, getattr(args, "config_name", None)):
    flag = "--model_name_or_path" if args.model_name_or_path else "--config_name"
  load = lambda n: transformers.AutoTokenizer.from_pretrained(n, trust_remote_code=False)  # noqa: E731
  return from_source(flag, args.tokenizer_name, load)


def model_config(args: argparse.Namespace):
  """The base model's transformers config (``--model_name_or_path``'s, or ``--config_name``),
  read before its weights so the tokenizer and the data can be checked against it first."""
  import transformers

  if args.model_name_or_path:
    load = lambda n: transformers.AutoConfig.from_pretrained(n, trust_remote_code=False)  # noqa: E731
    return from_source("--model_name_or_path", args.model_name_or_path, load)
  return load_config(args.config_name)


def check_vocabulary(tokenizer, config, flag: str = "--tokenizer_name") -> None:
  """Refuses a tokenizer with more tokens than the model's embedding table has rows: its ids
  past the table would be looked up out of range (NaN at step 1, not an error).

  Example:
    >>> import types
    >>> check_vocabulary([0] * 500, types.SimpleNamespace(vocab_size=100))
    Traceback (most recent call last):
    ...
    ValueError: the tokenizer (--tokenizer_name) has 500 tokens, more than the model's ...
  """
  n, vocab = len(tokenizer), getattr(config, "vocab_size", None)
  if vocab is not None and n > vocab:
    raise ValueError(
      f"the tokenizer ({flag}) has {n} tokens, more than the model's vocabulary of {vocab} "
      f"(vocab_size): ids {vocab} to {n - 1} would index past its embedding table; use the "
      f"model's own tokenizer, or a model with vocab_size >= {n}"
    )


# Models whose position ids start after the padding index (transformers' create_position_ids_
# from_input_ids): max_position_embeddings - (pad_token_id + 1) tokens fit.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def fit_max_seq_length(args: argparse.Namespace, tokenizer, config) -> None:
  """Lowers ``args.max_seq_length`` to what the model's position table (and the tokenizer's
  ``model_max_length``) holds, with a warning, as transformers' ``run_glue.py`` does: longer
  rows would look positions up out of range (NaN at step 1, not an error)."""
  limits = []
  positions = getattr(config, "max_position_embeddings", None)
  if positions:
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS and config.pad_token_id is not None:
      positions -= config.pad_token_id + 1
    limits.append((positions, f"the model's {positions} positions (max_position_embeddings)"))
  model_max = getattr(tokenizer, "model_max_length", None)
  if isinstance(model_max, int) and 0 < model_max < 1_000_000:
    limits.append((model_max, f"the tokenizer's model_max_length {model_max}"))
  for limit, what in sorted(limits):
    if args.max_seq_length > limit:
      logger.warning(
        "--max_seq_length %d is longer than %s: using %d", args.max_seq_length, what, limit
      )
      args.max_seq_length = limit


def load_config(name: str):
  """``--config_name``: a transformers config from a ``config.json``, a folder or a Hub id."""
  import transformers

  path = pathlib.Path(name)
  if path.is_dir() and not (path / "config.json").is_file():
    raise FileNotFoundError(f"--config_name {name!r} is a folder without config.json")
  if not path.exists() and name.endswith(".json"):
    raise FileNotFoundError(f"--config_name {name!r} does not exist")
  load = lambda n: transformers.AutoConfig.from_pretrained(n, trust_remote_code=False)  # noqa: E731
  return from_source("--config_name", name, load)


def base_model_path(args: argparse.Namespace) -> str:
  """The adapter's base checkpoint: ``--model_name_or_path``, or ``OUTPUT_DIR/base_model``."""
  return args.model_name_or_path or str(pathlib.Path(args.output_dir) / "base_model")


def export_base_model(args: argparse.Namespace, config, tokenizer, params) -> None:
  """Writes a from-scratch model's random base to ``OUTPUT_DIR/base_model``, a checkpoint.

  ``params`` without their adapters: the frozen base the adapter was trained on and applies to
  (PEFT's ``base_model_name_or_path``), with any trained head (the adapter carries it too, as
  ``modules_to_save``). For a PiSSA or OLoRA start ``params`` is :func:`step_zero`'s tree,
  whose merge is the original base (the residual plus the initial adapter).
  """
  base = lora_jax.merge(params) if _rewrites_base(params) else lora_jax.unload(params)
  models.export_merged(base_model_path(args), base, config=config, tokenizer=tokenizer)
  logger.info(
    "wrote the base model (random weights, seed %d) to %s", args.seed, base_model_path(args)
  )


def base_model(args: argparse.Namespace, task: str, **kwargs):
  """``(module, variables, transformers config)``: the checkpoint ``--model_name_or_path``, or,
  with ``--config_name``, a new model with random weights from ``--seed`` ("from scratch";
  :func:`export` writes them), computing in ``--dtype``. ``kwargs`` go to
  ``models.from_pretrained`` / ``from_config`` (``quantize=`` from :func:`quantization`: the
  checkpoint is quantized as it is read).
  """

  kwargs = {"dtype": jnp_dtype(args.dtype), **kwargs}

  if args.model_name_or_path:
    flag, name = "--model_name_or_path", args.model_name_or_path
    config = model_config(args)
    module, variables = from_source(
      flag, name, lambda n: models.from_pretrained(n, task, rng=args.seed, **kwargs)
    )
    return module, variables, config
  config = load_config(args.config_name)
  logger.info(
    "Training new model from scratch: %s from %s, random weights from seed %d",
    config.model_type,
    args.config_name,
    args.seed,
  )
  module, variables = models.from_config(config, task, rng=args.seed, **kwargs)
  return module, variables, config


def attention_implementation(args: argparse.Namespace) -> str | None:
  """The model's ``attention_implementation`` for ``--attn_implementation`` (``auto``: None,
  the library's default)."""
  return None if args.attn_implementation == "auto" else args.attn_implementation


def model_source(args: argparse.Namespace) -> str:
  """Where the base weights come from: a checkpoint, or a config and a seed (from scratch)."""
  if args.model_name_or_path:
    model = args.model_name_or_path
    return str(pathlib.Path(model).resolve()) if pathlib.Path(model).exists() else model
  return f"new model from {pathlib.Path(args.config_name).resolve()}, seed {args.seed}"


def fingerprint(arrays) -> str:
  """``"CRC-32 1a2b3c4d"`` of ``arrays``' values and shapes: the training data as tokenised, so a
  resume on other rows (another file, its content edited, another ``--max_train_samples``, chat
  template or loss mask) is refused. One pass over the tokens: cheap next to one step."""
  crc = 0
  for a in arrays:
    a = np.ascontiguousarray(a)
    crc = zlib.crc32(f"{a.dtype}{a.shape}".encode(), crc)
    crc = zlib.crc32(a.tobytes(), crc)
  return f"CRC-32 {crc:08x}"


def signature(args: argparse.Namespace, module, params, *, train_rows: int, train_data: str,
              **task) -> dict:  # fmt: skip
  """What a checkpoint must agree on to be resumed by this run (shapes are checked too), each
  input under its flag's name: the base model, the adapters, the quantization, the training
  data (``train_rows`` and its :func:`fingerprint` ``train_data``) and the ``task``'s own
  settings that shape the batches (e.g. ``max_seq_length``, ``packing``, the global batch).
  :func:`train.engine.run.training_signature` adds the optimizer's and schedule's."""
  cfg = module.config
  return {
    "model_name_or_path": model_source(args),
    "model": f"{cfg.model_type} vocab={cfg.vocab_size} hidden={cfg.hidden_size} "
    f"layers={cfg.num_hidden_layers}",
    **task,
    "lora": adapter_summary(params),
    "quantize": args.quantize,
    "train_rows": train_rows,
    "train_data": train_data,
  }


def load_adapter(path: str, variables, config, ignore_mismatched_sizes: bool = False):
  """An adapter in our format (``lora_jax.save_adapter``) or PEFT's (folder or Hub id).

  ``ignore_mismatched_sizes``: a saved head of another shape (another label count) is not
  loaded; the model keeps its new head (PEFT format only).
  """
  folder = pathlib.Path(path)
  if (folder / "adapter_config.json").exists() or not folder.exists():
    return lora_jax.import_peft(
      path, variables, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes
    )
  if ignore_mismatched_sizes:
    raise ValueError(
      f"--ignore_mismatched_sizes applies to adapters in PEFT's format (adapter_config.json); "
      f"{path!r} is in lora_jax's: export it with lora_jax.export_peft, or start from the run's "
      "OUTPUT_DIR/adapter"
    )
  return lora_jax.load_adapter(path, variables)


def _specs(params) -> list[lora_jax.LoraSpec]:
  is_spec = lambda x: isinstance(x, lora_jax.LoraSpec)  # noqa: E731
  return [leaf for leaf in jax.tree.leaves(params, is_leaf=is_spec) if is_spec(leaf)]


def _rewrites_base(params) -> bool:
  """Whether an adapter started from PiSSA or OLoRA, which move part of ``W`` into it."""
  return any(flags.rewrites_base(s.init) for s in _specs(params))


def adapter_summary(params) -> str:
  """``"2 x r=8 alpha=16.0 rslora=False dropout=0.1"``: the adapters' settings, for checkpoint
  signatures (``dora``, and an ``init`` other than gaussian, are named where they apply); for a
  bank, each adapter's (``"fr: ..., de: ..."``)."""
  if lora_jax.is_bank(params):
    return "; ".join(
      f"{name}: {adapter_summary(lora_jax.bank_adapter(params, name))}"
      for name in lora_jax.bank_names(params)
    )
  counts = collections.Counter(
    f"r={s.rank} alpha={s.alpha} rslora={s.rslora} dropout={s.dropout}"
    + (" dora" if s.use_dora else "")
    + (f" init={s.init}" if s.init != "gaussian" else "")
    for s in _specs(params)
  )
  return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))


def step_zero(params):
  """What a PiSSA or OLoRA start needs at export: ``params`` as :func:`lora_jax.lora_init` left
  them (adapter leaves copied to the host, so a donated training state cannot take them; the
  base shared), for ``export_peft(initial=...)``; None for starts that leave the base alone.

  Those starts move part of each adapted weight into its adapter, so the trained adapter is
  relative to the residual base; the export rewrites it for the original base (rank 2r).
  """
  if not _rewrites_base(params):
    return None
  adapters, base = lora_jax.partition(params, lora_jax.trainable_mask(params))
  return lora_jax.combine(jax.tree.map(np.array, adapters), base)


def export(args, config, tokenizer, params, out: pathlib.Path, *, task_type: str,
           extra_trainable=(), initial=None) -> None:  # fmt: skip
  """The adapter in PEFT's format (``OUTPUT_DIR/adapter``; a bank's adapters each in
  ``adapter/NAME``); ``--export_merged``: ``merged/``.

  A model trained from scratch also gets its base written (``base_model/``, see
  :func:`export_base_model`): the adapter is useless without those random weights.
  ``initial``: :func:`step_zero`'s tree, for PiSSA and OLoRA starts (the adapter is then
  written for the original base, and so is ``base_model/``).
  """
  if jax.process_index() != 0:
    return
  if not args.model_name_or_path:
    export_base_model(args, config, tokenizer, params if initial is None else initial)
  banked = lora_jax.is_bank(params)
  for name in lora_jax.bank_names(params) if banked else [None]:
    folder = out / "adapter" if name is None else out / "adapter" / name
    lora_jax.export_peft(
      folder,
      params if name is None else lora_jax.bank_adapter(params, name),
      base_model_name_or_path=base_model_path(args),
      config=config,
      task_type=task_type,
      extra_trainable=extra_trainable,
      initial=initial,
    )
    logger.info(
      "wrote the adapter%s (PEFT format) to %s", "" if name is None else f" {name!r}", folder
    )
  if args.export_merged:
    models.export_merged(out / "merged", params, config=config, tokenizer=tokenizer)
    logger.info("wrote the merged model to %s", out / "merged")
