"""Worker: times the PyTorch + PEFT training step for one configuration; prints one result row.

The step of ``../shared/bench/peft_baseline.py`` (``RobertaForSequenceClassification`` in train
mode, ``LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS")``, so the classifier head trains
too; fused AdamW; ``loss.backward()``; ``opt.step()``; ``zero_grad(set_to_none=True)``), made to
run on a CPU as well as on a GPU and to read the same configurations and options as the
lora_jax worker. ``python -m bench.peft_step '<options as JSON>'``; ``options["compile"]``
selects ``torch.compile``.

Differences from the shared baseline, all chosen to match the lora_jax side: the attention-
probability dropout is ``options["attn_dropout"]`` (lora_jax's fused attention has none; the
shared script keeps RoBERTa's 0.1 unless ``ATTN_DROPOUT`` is set), LoRA dropout is
``options["lora_dropout"]``, and autocast is used only with ``--dtype bfloat16``. Causal-LM
configurations build their step in ``bench/llm_peft.py``.
"""

from __future__ import annotations

import json
import sys
import time

import peft
import torch
import transformers

from bench import configs
from bench import flops
from bench import llm_peft
from bench import measure
from bench import torch_train


def _device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def build(cfg: configs.BenchConfig, opts: dict, device: torch.device):
  """The step closure, parameter counts, losses and attention implementation."""
  if cfg.is_llm:
    return llm_peft.build(cfg, opts, device, _sync)
  torch.manual_seed(opts["seed"])
  hf = transformers.RobertaConfig.from_dict(opts["hf_config"])
  lora = None  # full fine-tuning
  if cfg.mode == "lora":
    lora = peft.LoraConfig(
      r=configs.RANK,
      lora_alpha=configs.ALPHA,
      target_modules=list(cfg.targets),
      lora_dropout=opts["lora_dropout"],
      task_type="SEQ_CLS",
    )
  model, params, opt, attn_impl = torch_train.prepare(
    transformers.RobertaForSequenceClassification(hf).to(device), opts, lora
  )
  ids = torch.randint(5, cfg.model.vocab, (cfg.batch, cfg.seq), device=device)
  labels = torch.randint(0, cfg.model.labels, (cfg.batch,), device=device)
  mask = torch.ones_like(ids)
  step, counts, losses = torch_train.make_step(
    model, params, opt, opts,
    lambda fn: fn(input_ids=ids, attention_mask=mask, labels=labels), device, _sync,
  )  # fmt: skip
  return step, counts, losses, attn_impl


def run(opts: dict) -> dict:
  """Builds, warms up and times one configuration; returns its row."""
  cfg = configs.CONFIGS[opts["config"]]
  device = _device()
  torch.ones(1, device=device)  # start the runtime before the baseline RSS
  base_rss = measure.rss_gib()
  step, counts, losses, attn_impl = build(cfg, opts, device)
  t0 = time.perf_counter()
  step()  # first step: torch.compile traces and compiles here
  first_s = time.perf_counter() - t0
  measure.time_steps(step, max(opts["warmup"] - 1, 0))
  setup_peak = measure.peak_rss_gib()
  measure.trim_heap()
  measure.reset_peak_rss()
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  baton = measure.Baton(opts["lockstep"])
  baton.ready()
  times = measure.time_steps(step, opts["steps"], baton)
  peak_rss = measure.peak_rss_gib()
  row = measure.summarize(times, cfg.tokens)
  med_s = row["step_ms"] / 1e3
  model_flops = flops.model_flops(cfg)
  on_device = device.type == "cuda"
  return {
    **row,
    "compile_s": round(max(first_s - med_s, 0.0), 2),
    "peak_mem_gib": measure.rounded(
      torch.cuda.max_memory_allocated() / measure.GIB if on_device else peak_rss
    ),
    "mem_source": "torch max_memory_allocated" if on_device else "process RSS, timed steps",
    "rss_base_gib": measure.rounded(base_rss),
    "rss_setup_peak_gib": measure.rounded(setup_peak),
    "rss_step_peak_gib": measure.rounded(peak_rss),
    **counts,
    "model_flops": model_flops,
    "xla_flops": None,
    "xla_over_model_flops": None,
    "model_tflops_per_s": round(model_flops / med_s / 1e12, 4),
    "mfu": round(model_flops / med_s / (opts["peak_tflops"] * 1e12), 4)
    if opts["peak_tflops"]
    else None,
    "final_loss": float(losses[-1]) if losses else None,
    "torch_attention": attn_impl,
    "torch_threads": torch.get_num_threads(),
    "device": torch.cuda.get_device_name() if on_device else "cpu",
    "versions": {
      "torch": torch.__version__,
      "transformers": transformers.__version__,
      "peft": peft.__version__,
    },
  }


def main(argv: list[str]) -> None:
  opts = json.loads(argv[0])
  cfg = configs.CONFIGS[opts["config"]]
  row = {
    "side": "peft",
    "impl": "torch.compile" if opts["compile"] else "eager",
    "config": cfg.name,
    "mode": cfg.mode,
    "targets": list(cfg.targets) if cfg.targets else None,
    "seq": cfg.seq,
    "batch": cfg.batch,
    "tokens": cfg.tokens,
    "batch_kind": cfg.batch_kind,
    **{k: opts.get(k) for k in configs.ROW_OPTIONS},
  }
  try:
    row.update(run(opts))
  except Exception as e:  # report the failure as a row (e.g. out of memory) and go on
    measure.fail(row, e)
  measure.emit(row)


if __name__ == "__main__":
  main(sys.argv[1:])
