"""A GLUE LoRA run end to end: :func:`train_and_evaluate` (``train/run_glue.py`` parses flags).

1. Data (:mod:`train.data.glue`): Hub or local files, tokenised with the checkpoint's tokenizer.
2. Model: ``lora_jax.models.from_pretrained(..., "sequence-classification")`` (``--config_name``:
   ``from_config``, random weights), adapters from a :class:`lora_jax.LoraRule` built from the
   ``--lora_*`` flags, the classifier head trainable.
3. Training (:func:`train.engine.run.run`, the machinery every script shares, with GLUE's loss
   and evaluation from :mod:`train.tasks.glue.task`): the trainable partition only, in the
   ``--parallel`` mode; Orbax checkpoints every ``--save_steps`` under
   ``OUTPUT_DIR/checkpoints``; rerunning the same command resumes from the latest one.
4. Evaluation with the task's GLUE metrics (:mod:`train.tasks.glue.metrics`), outputs
   (:mod:`train.engine.outputs`), predictions and exports.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import re

import jax

import lora_jax
from train.cli.flags import as_dict
from train.data import glue as glue_data
from train.data.batching import bucket_lengths
from train.engine import outputs
from train.engine import run
from train.engine.parallel import data_parallel_size
from train.tasks import setup
from train.tasks.glue import metrics as glue_metrics
from train.tasks.glue import task as glue_task

logger = logging.getLogger(__name__)

EXTRA_TRAINABLE = ("classifier",)  # the task head, as PEFT's modules_to_save for SEQ_CLS


# The task head is trained whole (EXTRA_TRAINABLE): never give it an adapter, also not with
# "all-linear" or a broad regex (PEFT's "all-linear" also leaves the output layer out).
HEAD_MODULES = r"(.*/)?classifier(/.*)?"


# ---------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass
class Data:
  """Tokenised splits as :class:`glue_data.Examples`; eval/test dicts keep the main split first."""

  train: glue_data.Examples | None
  evals: dict[str, glue_data.Examples]
  tests: dict[str, glue_data.Examples]
  label_names: list[str] | None


def load_data(args: argparse.Namespace, task: glue_data.GlueTask, tokenizer) -> Data:
  raw = glue_data.load_raw(
    task,
    train_file=args.train_file,
    validation_file=args.validation_file,
    test_file=args.test_file,
  )
  first = raw["train"] if "train" in raw else next(iter(raw.values()))
  keys = glue_data.text_keys(first, task)
  names = glue_data.label_names(first, task)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  def examples(split: str, limit: int | None) -> glue_data.Examples:
    ds = raw[split]
    if limit is not None:
      ds = ds.select(range(min(limit, len(ds))))
    tok = glue_data.tokenize(ds, tokenizer, keys, args.max_seq_length)
    return glue_data.to_examples(
      tok, args.max_seq_length, pad_id=pad_id, regression=task.is_regression, names=names
    )

  train = examples("train", args.max_train_samples) if "train" in raw else None
  if train is not None:
    glue_data.check_labels(train, task.num_labels, "the training split")
  evals = {s: examples(s, args.max_eval_samples) for s in glue_data.split_names(raw, task, "eval")}
  tests = {}
  if args.do_predict:
    tests = {
      s: examples(s, args.max_predict_samples) for s in glue_data.split_names(raw, task, "test")
    }
  return Data(train, evals, tests, names)


# ---------------------------------------------------------------------------------------------
# Model.


def load_model(args: argparse.Namespace, task: glue_data.GlueTask):
  """``(module, params with adapters, transformers config)``.

  The base model is the checkpoint ``--model_name_or_path``, or, with ``--config_name``, a new
  model with random weights from ``--seed`` ("from scratch"; :func:`export` writes them).
  Adapters come from the ``--lora_*`` flags, or, with ``--adapter_name_or_path``, from that
  adapter (its own rank, alpha and targets; its classifier head too, if it saved one).
  """
  module, variables, config = setup.base_model(
    args,
    "sequence-classification",
    num_labels=task.num_labels,
    attention_implementation=setup.attention_implementation(args),
    quantize=setup.quantization(args, HEAD_MODULES),
  )
  config.num_labels = task.num_labels
  if args.adapter_name_or_path:
    params = setup.load_adapter(
      args.adapter_name_or_path, variables, config, args.ignore_mismatched_sizes
    )
  else:
    params = lora_jax.lora_init(
      variables, setup.lora_rule(args, HEAD_MODULES), rng=jax.random.key(args.seed + 1)
    )
  return module, params, config


def check_not_the_head(rule: lora_jax.LoraRule) -> None:
  """Refuses ``--lora_target_modules`` naming the task head: it is trained whole, not adapted.

  Example:
    >>> check_not_the_head(lora_jax.LoraRule(["query", "classifier"], rank=8))
    Traceback (most recent call last):
    ...
    ValueError: --lora_target_modules 'classifier' names the classification head, which is ...
  """
  for target in rule.targets():
    if re.fullmatch(HEAD_MODULES, target.replace(".", "/")):
      raise ValueError(
        f"--lora_target_modules {target!r} names the classification head, which is trained "
        f"whole (every weight, as PEFT's modules_to_save) and never adapted: leave it out"
      )


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
  task = glue_data.TASKS[args.task_name]
  out = pathlib.Path(args.output_dir)
  if not args.adapter_name_or_path:
    check_not_the_head(setup.lora_rule(args, HEAD_MODULES))
  tokenizer = setup.load_tokenizer(args)
  config = setup.model_config(args)
  setup.check_vocabulary(tokenizer, config)
  setup.fit_max_seq_length(args, tokenizer, config)
  data = load_data(args, task, tokenizer)
  if data.train is None:
    raise ValueError("no training split: give --train_file (or use the Hub's GLUE)")
  module, params, hf_config = load_model(args, task)
  logger.info(lora_jax.param_report(params, EXTRA_TRAINABLE).splitlines()[0])
  initial = None if args.adapter_name_or_path else setup.step_zero(params)

  devices = data_parallel_size(args.parallel)
  global_batch = args.per_device_train_batch_size * devices
  k = args.gradient_accumulation_steps
  total = run.total_steps(len(data.train), global_batch, k, args.num_train_epochs, args.max_steps)
  classification = glue_task.Classification(
    apply_fn=lora_jax.lora_apply(module.apply),
    task=task,
    train=data.train,
    evals=data.evals,
    global_batch=global_batch,
    eval_batch=args.per_device_eval_batch_size * devices,
    buckets=bucket_lengths(args.max_seq_length),
    seed=args.seed,
    pack_sequences=args.pack_sequences,
  )
  logger.info(
    "%d training rows, %d steps of %d rows x %d (accumulation), %s parallel over %d device(s)",
    len(data.train),
    total,
    global_batch,
    k,
    args.parallel,
    devices,
  )

  def finish(trained: run.Trained) -> None:
    predict(classification, trained, data, out)
    setup.export(
      args,
      hf_config,
      tokenizer,
      trained.params,
      out,
      task_type="SEQ_CLS",
      extra_trainable=EXTRA_TRAINABLE,
      initial=initial,
    )

  return run.Plan(
    params,
    classification,
    run.settings_from_flags(args, total, lr_scheduler_type="linear"),
    signature=setup.signature(
      args,
      module,
      params,
      task_name=args.task_name,
      num_labels=module.config.num_labels,
      max_seq_length=args.max_seq_length,
      pack_sequences=args.pack_sequences,
      train_batch_size=global_batch,
      train_rows=len(data.train),
      train_data=setup.fingerprint(
        [data.train.input_ids, data.train.token_type_ids, data.train.lengths, data.train.labels]
      ),
    ),
    record=as_dict(args),
    extra_trainable=EXTRA_TRAINABLE,
    finish=finish,
  )


def predict(classification, trained, data: Data, out: pathlib.Path) -> None:
  """``predict_results.tsv`` (MNLI mismatched: ``predict_results_mm.tsv``)."""
  for i, (split, ex) in enumerate(data.tests.items()):
    logits = classification.logits(trained.parallel, trained.trainable, trained.frozen, ex)
    preds = glue_metrics.predictions(logits, classification.task.is_regression)
    if jax.process_index() == 0:
      name = "predict_results.tsv" if i == 0 else "predict_results_mm.tsv"
      outputs.write_predictions(out / name, preds, data.label_names)
      logger.info("wrote %d predictions for %s to %s", len(preds), split, out / name)
