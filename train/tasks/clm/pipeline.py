"""A causal-LM LoRA run end to end: :func:`train_and_evaluate` (``train/run_clm.py`` parses flags).

1. Data (:mod:`train.data.clm`): text or conversations, loss masks, packed or padded rows.
2. Model: ``lora_jax.models.from_pretrained(..., "causal-lm")`` (``--config_name``: random
   weights, from scratch), scanned layers and remat if asked, adapters from the ``--lora_*``
   flags (``all-linear`` by default) or ``--adapter_name_or_path``.
3. Training: :func:`train.engine.run.run`, the machinery ``run_glue.py`` uses too, with the
   :class:`train.tasks.clm.task.CausalLM` task (next-token loss over the target tokens, eval loss
   and perplexity, greedy samples of ``--generation_prompts_file`` at every evaluation).
4. Outputs: ``metrics.jsonl``, ``eval_results.json``, ``samples.jsonl``, ``curves.png``, the
   adapter in PEFT's format (``CAUSAL_LM``), Orbax checkpoints, ``--export_merged``.

``--adapter_column COLUMN`` trains several adapters at once: one per name in that column of the
training split, in one adapter bank over the base (:func:`lora_jax.adapter_bank`); each example
trains its own adapter (a packed row holds one adapter's examples), evaluation reports each
adapter's loss beside the whole, and each adapter is written to ``adapter/NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp

import lora_jax
from lora_jax.models.decoder import llama
from train.cli.flags import as_dict
from train.data import clm as clm_data
from train.engine import run
from train.engine.parallel import data_parallel_size
from train.tasks import setup
from train.tasks.clm.sampler import SAMPLES
from train.tasks.clm.sampler import Sampler
from train.tasks.clm.sampler import read_prompts
from train.tasks.clm.task import CausalLM

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data and model.


@dataclasses.dataclass
class Data:
  train: clm_data.Sequences
  eval: clm_data.Sequences | None
  kind: str  # clm_data.TEXT or clm_data.MESSAGES
  adapters: tuple[str, ...] | None = None  # --adapter_column's names, in the bank's order


def load_data(args: argparse.Namespace, tokenizer) -> Data:
  raw = clm_data.load_raw(
    dataset_name=args.dataset_name,
    dataset_config_name=args.dataset_config_name,
    train_file=args.train_file,
    validation_file=args.validation_file,
    validation_split_percentage=args.validation_split_percentage,
    seed=args.seed,
  )
  source = args.train_file or args.dataset_name
  kind, column = clm_data.pick_column(
    raw["train"].column_names, args.text_column, args.messages_column, repr(source)
  )
  completion_only = (
    kind == clm_data.MESSAGES if args.completion_only_loss is None else args.completion_only_loss
  )
  if completion_only and kind != clm_data.MESSAGES:
    raise ValueError(
      f"--completion_only_loss needs conversations (a messages column); {source!r} has the "
      f"text column {column!r}"
    )

  adapters = None  # the training split's names, which the validation split's must be among

  def encode(split: str, limit: int | None):
    ds = raw[split]
    if column not in ds.column_names:
      raise ValueError(
        f"the {split} split has no {column!r} column (the train split's); its columns: "
        f"{ds.column_names}"
      )
    if limit is not None:
      ds = ds.select(range(min(limit, len(ds))))
    name = args.train_file if split == "train" else args.validation_file
    where = f"{name!r} (the {split} split)" if name else f"the {split} split of {source!r}"
    seqs = clm_data.encode(ds, kind, column, tokenizer, args.max_seq_length, completion_only, where)
    if args.adapter_column:
      if args.adapter_column not in ds.column_names:
        raise ValueError(
          f"--adapter_column {args.adapter_column!r}: {where} has no such column; its columns: "
          f"{ds.column_names}"
        )
      names, ids = clm_data.adapter_ids(ds[args.adapter_column], adapters, args.adapter_column,
                                        where)  # fmt: skip
      seqs.adapters = ids if seqs.kept is None else ids[seqs.kept]
      return seqs, names
    return seqs, None

  train, adapters = encode("train", args.max_train_samples)
  evals = encode("validation", args.max_eval_samples)[0] if "validation" in raw else None
  return Data(train, evals, kind, adapters)


def load_model(args: argparse.Namespace, adapters: tuple[str, ...] | None = None):
  """``(module, params with adapters, transformers config)``; with ``adapters`` (names), a bank
  of one new adapter per name (:func:`lora_jax.adapter_bank`), each from its own seed."""
  module, variables, config = setup.base_model(
    args,
    "causal-lm",
    scan_layers=args.scan_layers,
    remat=args.remat,
    attention_implementation=setup.attention_implementation(args),
    quantize=setup.quantization(args),
  )
  if args.adapter_name_or_path:
    params = setup.load_adapter(args.adapter_name_or_path, variables, config)
  else:
    layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 1), jnp.int32))
    rule = setup.lora_rule(args)

    def new(i: int):
      return lora_jax.lora_init(variables, rule, rng=jax.random.key(args.seed + 1 + i),
                                layouts=layouts)  # fmt: skip

    if adapters is None:
      params = new(0)
    else:
      params = lora_jax.adapter_bank({name: new(i) for i, name in enumerate(adapters)})
  return module, params, config


def fit_batch(args: argparse.Namespace, rows: int, devices: int) -> int:
  """The global batch in rows: ``--per_device_train_batch_size`` x ``devices``, lowered (with a
  warning, in ``args`` too) when the training set makes fewer rows than one optimizer step
  takes, so a small dataset trains with the defaults; refused in one line, naming what would
  work, when not even one row per device fits."""
  k = args.gradient_accumulation_steps
  if rows >= args.per_device_train_batch_size * devices * k:
    return args.per_device_train_batch_size * devices
  what = f"{rows} {'packed' if args.packing else 'padded'} rows"
  per_device = rows // (devices * k)
  if per_device == 0:
    fits = rows // devices
    raise ValueError(
      f"the training set makes {what}, fewer than one optimizer step of {devices} device(s) x "
      f"1 row x {k} (--gradient_accumulation_steps) takes: "
      + (f"use --gradient_accumulation_steps {fits} or less" if fits else "use fewer devices")
      + ", or add data"
    )
  logger.warning(
    "the training set makes %s, fewer than one optimizer step of --per_device_train_batch_size "
    "%d x %d device(s) x %d (--gradient_accumulation_steps): using --per_device_train_batch_size "
    "%d",
    what, args.per_device_train_batch_size, devices, k, per_device,
  )  # fmt: skip
  args.per_device_train_batch_size = per_device
  return per_device * devices


def _sampler(args, module, params, tokenizer, kind: str, out: pathlib.Path,
             adapters: tuple[str, ...] | None) -> Sampler | None:  # fmt: skip
  if not args.generation_prompts_file:
    return None
  prompts, references, ids_of = read_prompts(
    args.generation_prompts_file, args.adapter_column, adapters
  )
  if kind == clm_data.MESSAGES:  # ask as a user turn, as the model is trained
    ids = [
      clm_data.render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
      for p in prompts
    ]
  else:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
  base = lora_jax.partition(params, lora_jax.trainable_mask(params))[1]
  return Sampler(module, base, prompts, references, ids, tokenizer,
                 args.generation_max_new_tokens, out / SAMPLES, ids_of)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(args: argparse.Namespace, on_step=None) -> dict:
  """Trains (or resumes), evaluates and writes every output; returns the final eval results.

  ``on_step(step)`` is called after each optimizer step (tests simulate a crash with it).
  """
  return run.run(plan(args), on_step).results


def plan(args: argparse.Namespace) -> run.Plan:
  """The run ``args`` ask for, set up (data read, model loaded) but nothing trained or written:
  what :func:`train_and_evaluate` runs, and what :mod:`train.engine.lowering` lowers."""
  out = pathlib.Path(args.output_dir)
  tokenizer = setup.load_tokenizer(args)
  setup.check_vocabulary(tokenizer, setup.model_config(args))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  data = load_data(args, tokenizer)
  module, params, hf_config = load_model(args, data.adapters)
  logger.info(lora_jax.param_report(params).splitlines()[0])
  initial = None if args.adapter_name_or_path else setup.step_zero(params)

  devices = data_parallel_size(args.parallel)
  global_rows = args.per_device_train_batch_size * devices
  k = args.gradient_accumulation_steps
  train = clm_data.Batcher(data.train, args.max_seq_length, args.packing, pad_id)
  global_rows = fit_batch(args, train.rows, devices)
  total = run.total_steps(train.rows, global_rows, k, args.num_train_epochs, args.max_steps)
  task = CausalLM(
    apply_fn=lora_jax.lora_apply(module.apply),
    train=train,
    eval=None
    if data.eval is None
    else clm_data.Batcher(data.eval, args.max_seq_length, args.packing, pad_id),
    global_rows=global_rows,
    eval_rows=args.per_device_eval_batch_size * devices,
    seed=args.seed,
    fused_loss=llama.output_weight(module.config, params["params"])[1] is not None,
    adapters=data.adapters,
  )
  task.sampler = _sampler(args, module, params, tokenizer, data.kind, out, data.adapters)
  logger.info(
    "%d training sequences in %d %s rows; %d steps of %d rows x %d (accumulation), %s parallel "
    "over %d device(s)",
    len(data.train),
    train.rows,
    "packed" if args.packing else "padded",
    total,
    global_rows,
    k,
    args.parallel,
    devices,
  )
  return run.Plan(
    params,
    task,
    run.settings_from_flags(
      args,
      total,
      lr_scheduler_type=args.lr_scheduler_type,
      max_grad_norm=args.max_grad_norm or None,
      eval_on_start=args.eval_on_start,
    ),
    signature=setup.signature(
      args,
      module,
      params,
      scan_layers=args.scan_layers,
      max_seq_length=args.max_seq_length,
      packing=args.packing,
      train_batch_size=global_rows,
      train_rows=len(data.train),
      train_data=setup.fingerprint(
        [*data.train.ids, *data.train.weights]
        + ([] if data.adapters is None else [data.train.adapters])
      ),
      **({} if data.adapters is None else {"adapter_column": list(data.adapters)}),
    ),
    record=as_dict(args),
    finish=lambda t: setup.export(
      args, hf_config, tokenizer, t.params, out, task_type="CAUSAL_LM", initial=initial
    ),
  )
