"""The SmolLM2 recipe in PyTorch + PEFT: a plain loop on ``run_clm.py``'s own padded batches.

The PEFT side of ``bench/clm_recipe.py``. It reads the same ``run_clm.py`` flags (``--config``
and overrides), so data, loss masks and batches are built by the same code
(``train.tasks.clm.pipeline.load_data``, ``train.data.clm.Batcher`` with ``packed=False``: each
batch padded to the length bucket of its longest conversation). It starts from a PEFT adapter folder
(``--adapter``; ``bench/clm_recipe.py`` writes one from lora_jax's initialisation and gives it
to both sides), and trains it the way ``run_clm.py`` does: AdamW (decoupled weight decay on
every adapter leaf), gradients clipped to ``--max_grad_norm``, the same warmup-and-decay
schedule (evaluated by ``train.engine.state.make_schedule``), the loss summed over the target
tokens of the whole batch and divided by their count.

Prints one JSON row (``bench.measure.emit``): each step's seconds (``step_s``: the whole
iteration, from taking the batch to the updated weights, as ``run_clm.py`` times its steps) and
batch shape (``step_shapes``), their median, the losses, and the final eval loss over the
validation batches. With ``--lockstep`` the steps take turns with a parent process
(``bench/clm_recipe.py``), as ``bench/clm_lockstep.py`` does for ``run_clm.py``.

Usage (repository root; the flags after ``--`` are run_clm.py's):
  python bench/peft_clm_recipe.py --adapter INIT_DIR -- --config configs/smollm2_dates.yaml \
      --no-packing --per_device_train_batch_size 8
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make `train` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np
import peft
import torch
import transformers

from bench import measure
from train.data import clm as clm_data
from train.engine import run
from train.engine import state as state_lib
from train.tasks.clm import args as clm_args
from train.tasks.clm import pipeline as clm_train


def _torch(batch: dict) -> dict:
  return {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}


def token_loss_sums(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
  """``(sum of weighted next-token losses, sum of weights)``, as ``train.tasks.clm.task.loss_terms``
  (padded rows: one sequence per row, so every next token is in the same sequence)."""
  b = _torch(batch)
  logits = model(input_ids=b["input_ids"].long(), attention_mask=b["attention_mask"]).logits
  nll = torch.nn.functional.cross_entropy(
    logits[:, :-1].float().flatten(0, 1), b["input_ids"][:, 1:].long().flatten(), reduction="none"
  )
  same = (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]) & (b["segment_ids"][:, 1:] > 0)
  w = (b["weights"][:, 1:] * same).flatten()
  return (nll * w).sum(), w.sum()


def train(args: argparse.Namespace, adapter: str, baton: measure.Baton | None = None) -> dict:
  """The loop; with a lockstep ``baton``, ready after the first step and each later step taken
  in turn (``bench/clm_lockstep.py`` is lora_jax's side)."""
  if args.packing:
    raise ValueError("the PEFT side runs padded batches: pass --no-packing")
  if args.gradient_accumulation_steps != 1:
    raise ValueError("the PEFT side runs without gradient accumulation")
  torch.manual_seed(args.seed)
  source = args.tokenizer_name or args.model_name_or_path
  tokenizer = transformers.AutoTokenizer.from_pretrained(source)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  data = clm_train.load_data(args, tokenizer)
  batcher = clm_data.Batcher(data.train, args.max_seq_length, False, pad_id)
  rows = args.per_device_train_batch_size
  total = run.total_steps(batcher.rows, rows, 1, args.num_train_epochs, args.max_steps)
  warmup = int(np.ceil(args.warmup_ratio * total))
  schedule = state_lib.make_schedule(args.lr_scheduler_type, args.learning_rate, total, warmup)
  rates = [float(schedule(i)) for i in range(total)]

  base = transformers.AutoModelForCausalLM.from_pretrained(
    args.model_name_or_path, dtype=torch.float32
  )
  model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
  # LambdaLR scales the base rate: step i runs at rates[i], as optax's schedule at count i
  sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda i: rates[min(i, total - 1)] / args.learning_rate
  )

  batches = batcher.train_batches(rows, args.seed)
  times, losses, examples, shapes, waited = [], [], 0, [], 0.0
  t_start = time.perf_counter()
  for i in range(total):
    if baton and i:
      t_wait = time.perf_counter()
      baton.wait()
      waited += time.perf_counter() - t_wait  # the other side's turn, not this loop's time
    t0 = time.perf_counter()  # the whole iteration, batch included, as run_clm.py's s_per_step
    batch = next(batches)
    shapes.append(list(batch["input_ids"].shape))
    total_loss, weight = token_loss_sums(model, batch)
    loss = total_loss / weight.clamp(min=1.0)
    loss.backward()
    if args.max_grad_norm:
      torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
    times.append(time.perf_counter() - t0)
    examples += int((batch["segment_ids"][:, 0] > 0).sum())
    if baton and i:
      baton.report(times[-1])
    elif baton:
      baton.ready()
  train_s = time.perf_counter() - t_start - waited

  if data.eval is None:
    raise ValueError("the recipe needs a validation split (--validation_file)")
  model.eval()
  eval_rows = args.per_device_eval_batch_size
  total_loss, weight = 0.0, 0.0
  with torch.no_grad():
    for batch in clm_data.Batcher(data.eval, args.max_seq_length, False, pad_id).eval_batches(
      eval_rows
    ):
      s, w = token_loss_sums(model, batch)
      total_loss, weight = total_loss + s.item(), weight + w.item()
  return {
    "side": "peft",
    "steps": total,
    "batch_shapes": sorted({tuple(s) for s in shapes}),
    "step_shapes": shapes,
    "step_s": times,
    "median_s_per_step": statistics.median(times),
    "s_per_step": train_s / total,
    "examples_per_s": examples / train_s,
    "losses": losses,
    "eval_loss": total_loss / max(weight, 1.0),
    "torch_threads": torch.get_num_threads(),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--adapter", required=True, help="the PEFT adapter folder to start from")
  p.add_argument("--lockstep", action="store_true", help="take turns with a parent process")
  p.add_argument("flags", nargs=argparse.REMAINDER, help="run_clm.py flags, after --")
  ns = p.parse_args(argv)
  flags = ns.flags[1:] if ns.flags[:1] == ["--"] else ns.flags
  baton = measure.Baton(lockstep=True) if ns.lockstep else None
  measure.emit(train(clm_args.parse_args(flags), ns.adapter, baton))
  return 0


if __name__ == "__main__":
  sys.exit(main())
