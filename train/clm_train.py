"""A causal-LM LoRA run end to end: :func:`train_and_evaluate` (``train/run_clm.py`` parses flags).

1. Data (:mod:`train.clm_data`): text or conversations, loss masks, packed or padded rows.
2. Model: ``lora_jax.models.from_pretrained(..., "causal-lm")`` (``--config_name``: random
   weights, from scratch), scanned layers and remat if asked, adapters from the ``--lora_*``
   flags (``all-linear`` by default) or ``--adapter_name_or_path``.
3. Training: :func:`train.loop.run`, the machinery ``run_glue.py`` uses too, with this module's
   :class:`CausalLM` task (next-token loss over the target tokens, eval loss and perplexity,
   greedy samples of ``--generation_prompts_file`` at every evaluation).
4. Outputs: ``metrics.jsonl``, ``eval_results.json``, ``samples.jsonl``, ``curves.png``, the
   adapter in PEFT's format (``CAUSAL_LM``), Orbax checkpoints, ``--export_merged``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from lora_jax import models
from lora_jax.models.decoder import llama
from lora_jax.models.decoder.generate import prompt_bucket
from train import clm_args
from train import clm_data
from train import loop
from train import outputs
from train import setup
from train import trainer

logger = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"


# ---------------------------------------------------------------------------------------------
# The task.


def token_losses(nll, batch):
  """``(weighted loss, weight)`` of each listed target, ``[rows, k]``, from :func:`forward`'s
  per-target cross-entropies."""
  w = batch["target_weights"]
  return nll * w, w


def loss_terms(nll, batch):
  """``(sum of weighted next-token losses, sum of weights)`` over a batch of rows."""
  loss, w = token_losses(nll, batch)
  return jnp.sum(loss), jnp.sum(w)


def forward(apply_fn, trainable, frozen, batch, *, fused: bool = True, **kwargs):
  """The cross-entropy of each of the batch's targets, ``[rows, k]`` float32.

  The model's outputs are formed at the batch's ``target_positions`` only
  (:func:`train.clm_data.targets`): the next-token losses that count, none other computed.
  ``fused``: by the decoder's ``target_ids=`` (the logits a chunk at a time, never whole);
  otherwise from the ``[rows, k, vocab]`` logits (an output layer with an adapter or a
  quantized weight, see :func:`lora_jax.models.decoder.llama.output_weight`).
  """
  variables = lora_jax.combine(trainable, frozen)
  if fused:
    kwargs["target_ids"] = batch["target_ids"]
  out = apply_fn(
    variables,
    batch["input_ids"],
    batch["attention_mask"],
    segment_ids=batch["segment_ids"],
    logits_index=batch["target_positions"],
    **kwargs,
  )
  if fused:
    return out
  return optax.softmax_cross_entropy_with_integer_labels(
    out.astype(jnp.float32), batch["target_ids"]
  )


def read_prompts(path: str) -> tuple[list[str], list[str] | None]:
  """Prompts of ``--generation_prompts_file`` and their reference answers, if it gives them.

  One prompt per line; or JSONL rows with ``"prompt"`` and, on every row or none,
  ``"completion"`` (the expected answer: samples then get an exact-match score).
  """
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"--generation_prompts_file {path!r} does not exist")
  prompts, references = [], []
  for i, line in enumerate(file.read_text().splitlines()):
    if not line.strip():
      continue
    if file.suffix != ".jsonl":
      prompts.append(line)
      continue
    row = json.loads(line)
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
      raise ValueError(f"{path}: line {i + 1} has no string 'prompt' field")
    prompts.append(row["prompt"])
    if "completion" in row:
      references.append(str(row["completion"]))
  if not prompts:
    raise ValueError(f"--generation_prompts_file {path!r} holds no prompt")
  if references and len(references) != len(prompts):
    raise ValueError(f"{path}: some rows have a 'completion' and some do not")
  return prompts, references or None


@dataclasses.dataclass
class Sampler:
  """Greedy answers to fixed prompts, from the current adapters (``samples.jsonl``)."""

  module: Any
  base: Any  # the frozen half, on the host side
  prompts: list[str]
  references: list[str] | None
  prompt_ids: list[list[int]]
  tokenizer: Any
  max_new_tokens: int
  path: pathlib.Path

  def __call__(self, step: int, trainable_host) -> dict[str, float]:
    """Writes this step's samples; returns ``samples_exact_match`` when references exist."""
    params = lora_jax.combine(trainable_host, self.base)
    # one call per length bucket: a short prompt is not padded to the longest one's bucket
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(self.prompt_ids):
      groups.setdefault(prompt_bucket(len(ids)), []).append(i)
    out: list[list[int]] = [[] for _ in self.prompt_ids]
    for members in groups.values():
      new_tokens = models.generate(
        self.module,
        params,
        [self.prompt_ids[i] for i in members],
        max_new_tokens=self.max_new_tokens,
        eos_token_id=self.tokenizer.eos_token_id,
      )
      for i, tokens in zip(members, new_tokens, strict=True):
        out[i] = tokens
    texts = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
    pairs = zip(self.prompts, texts, strict=True)
    new = [{"step": step, "prompt": p, "generation": t} for p, t in pairs]
    metrics = {}
    if self.references is not None:
      for row, ref in zip(new, self.references, strict=True):
        row["completion"], row["exact_match"] = ref, row["generation"] == ref.strip()
      metrics["samples_exact_match"] = float(np.mean([r["exact_match"] for r in new]))
    if jax.process_index() == 0:
      # rows of this step or later are from an interrupted run that this one replays
      rows = outputs.read_jsonl(self.path) if self.path.exists() else []
      outputs.write_jsonl(self.path, [r for r in rows if r["step"] < step] + new)
    return metrics


@dataclasses.dataclass
class CausalLM:
  """Supervised fine-tuning of a causal LM, for :func:`train.loop.run`."""

  apply_fn: Callable
  train: clm_data.Batcher
  eval: clm_data.Batcher | None
  global_rows: int
  eval_rows: int
  seed: int
  sampler: Sampler | None = None
  fused_loss: bool = True  # see forward()

  def loss(self, trainable, frozen, batch, rngs):
    nll = forward(self.apply_fn, trainable, frozen, batch, fused=self.fused_loss,
                  deterministic=False, rngs=rngs)  # fmt: skip
    return loss_terms(nll, batch)

  def eval_step(self, trainable, frozen, batch):
    """Per row: its summed target loss and its number of targets."""
    nll = forward(self.apply_fn, trainable, frozen, batch, fused=self.fused_loss,
                  deterministic=True)  # fmt: skip
    loss, w = token_losses(nll, batch)
    return jnp.stack([jnp.sum(loss, axis=1), jnp.sum(w, axis=1)], axis=1)

  def batches(self, start: int, data_parallel: int):
    return self.train.train_batches(self.global_rows, self.seed, start)

  def counts(self, batch: dict) -> tuple[int, int]:
    starts = (batch["segment_ids"] > 0) & (
      np.pad(batch["segment_ids"], ((0, 0), (1, 0)))[:, :-1] != batch["segment_ids"]
    )
    return int(starts.sum()), int(batch["attention_mask"].sum())

  def evaluate(self, step: int, parallel, trainable, frozen) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if self.eval is not None:
      t0, total, weight = time.perf_counter(), 0.0, 0.0
      for batch in self.eval.eval_batches(self.eval_rows):
        sums = parallel.eval(trainable, frozen, parallel.put_batch(batch))
        total, weight = total + float(sums[:, 0].sum()), weight + float(sums[:, 1].sum())
      loss = total / max(weight, 1.0)
      results = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "eval_tokens": int(weight),
        "eval_runtime_s": round(time.perf_counter() - t0, 3),
      }
    if self.sampler is not None:
      results.update(self.sampler(step, parallel.host(trainable)))
    return results


# ---------------------------------------------------------------------------------------------
# Data and model.


@dataclasses.dataclass
class Data:
  train: clm_data.Sequences
  eval: clm_data.Sequences | None
  kind: str  # clm_data.TEXT or clm_data.MESSAGES


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

  def encode(split: str, limit: int | None) -> clm_data.Sequences:
    ds = raw[split]
    if column not in ds.column_names:
      raise ValueError(
        f"the {split} split has no {column!r} column (the train split's); its columns: "
        f"{ds.column_names}"
      )
    if limit is not None:
      ds = ds.select(range(min(limit, len(ds))))
    return clm_data.encode(
      ds, kind, column, tokenizer, args.max_seq_length, completion_only, f"the {split} split"
    )

  train = encode("train", args.max_train_samples)
  evals = encode("validation", args.max_eval_samples) if "validation" in raw else None
  return Data(train, evals, kind)


def load_model(args: argparse.Namespace):
  """``(module, params with adapters, transformers config)``."""
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  module, variables, config = setup.base_model(
    args,
    "causal-lm",
    dtype=dtype,
    scan_layers=args.scan_layers,
    remat=args.remat,
    attention_implementation=None
    if args.attn_implementation == "auto"
    else args.attn_implementation,
    quantize=setup.quantization(args),
  )
  if args.adapter_name_or_path:
    params = setup.load_adapter(args.adapter_name_or_path, variables, config)
  else:
    layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 1), jnp.int32))
    params = lora_jax.lora_init(
      variables, setup.lora_rule(args), rng=jax.random.key(args.seed + 1), layouts=layouts
    )
  return module, params, config


def signature(args: argparse.Namespace, module, params, global_rows: int) -> dict:
  """What a checkpoint must agree on to be resumed by this run (shapes are checked too)."""
  cfg = module.config
  return {
    "model_name_or_path": setup.model_source(args),
    "model": f"{cfg.model_type} vocab={cfg.vocab_size} hidden={cfg.hidden_size} "
    f"layers={cfg.num_hidden_layers}",
    "scan_layers": args.scan_layers,
    "lora": setup.adapter_summary(params),
    "quantize": args.quantize,
    "data": f"max_seq_length={args.max_seq_length} packing={args.packing} rows={global_rows}",
  }


def _sampler(args, module, params, tokenizer, kind: str, out: pathlib.Path) -> Sampler | None:
  if not args.generation_prompts_file:
    return None
  prompts, references = read_prompts(args.generation_prompts_file)
  if kind == clm_data.MESSAGES:  # ask as a user turn, as the model is trained
    ids = [
      clm_data.render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True)
      for p in prompts
    ]
  else:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
  base = lora_jax.partition(params, lora_jax.trainable_mask(params))[1]
  return Sampler(module, base, prompts, references, ids, tokenizer,
                 args.generation_max_new_tokens, out / SAMPLES)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The run.


def train_and_evaluate(args: argparse.Namespace, on_step=None) -> dict:
  """Trains (or resumes), evaluates and writes every output; returns the final eval results.

  ``on_step(step)`` is called after each optimizer step (tests simulate a crash with it).
  """

  out = pathlib.Path(args.output_dir)
  tokenizer = setup.load_tokenizer(args)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  data = load_data(args, tokenizer)
  module, params, hf_config = load_model(args)
  logger.info(lora_jax.param_report(params).splitlines()[0])
  initial = None if args.adapter_name_or_path else setup.step_zero(params)

  devices = trainer.data_parallel_size(args.parallel)
  global_rows = args.per_device_train_batch_size * devices
  k = args.gradient_accumulation_steps
  train = clm_data.Batcher(data.train, args.max_seq_length, args.packing, pad_id)
  total = loop.total_steps(train.rows, global_rows, k, args.num_train_epochs, args.max_steps)
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
  )
  task.sampler = _sampler(args, module, params, tokenizer, data.kind, out)
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
  trained = loop.run(
    params,
    task,
    loop.settings_from_flags(
      args,
      total,
      lr_scheduler_type=args.lr_scheduler_type,
      max_grad_norm=args.max_grad_norm or None,
      eval_on_start=args.eval_on_start,
    ),
    signature=signature(args, module, params, global_rows),
    record=clm_args.as_dict(args),
    on_step=on_step,
    finish=lambda t: setup.export(
      args, hf_config, tokenizer, t.params, out, task_type="CAUSAL_LM", initial=initial
    ),
  )
  return trained.results
