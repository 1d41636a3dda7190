"""The PyTorch + PEFT side's model set-up and training step, shared by the encoder
(``bench/peft_step.py``) and causal-LM (``bench/llm_peft.py``) configurations.

Options as in ``bench.configs.ROW_OPTIONS``: ``remat`` is gradient checkpointing (lora_jax's
``--remat`` is ``nn.remat`` per layer), ``base_dtype="bfloat16"`` casts the base before PEFT wraps
it (adapters stay float32, as ``peft_baseline.py``'s ``bf16_weights``), ``dtype="bfloat16"`` is
autocast, ``compile`` wraps the model in ``torch.compile``. The optimizer is fused AdamW.
"""

from __future__ import annotations

from collections.abc import Callable

import peft
import torch


def prepare(model: torch.nn.Module, opts: dict, lora: peft.LoraConfig | None):
  """``(model, trainable parameters, optimizer, attention implementation)``; ``lora=None``
  trains every parameter (full fine-tuning)."""
  attn_impl = getattr(model.config, "_attn_implementation", None)
  if opts["remat"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if opts["base_dtype"] == "bfloat16":
    model = model.to(torch.bfloat16)
  if lora is not None:
    model = peft.get_peft_model(model, lora)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  return model, params, torch.optim.AdamW(params, lr=1e-4, fused=True), attn_impl


def make_step(model, params, opt, opts: dict, forward: Callable, device: torch.device, sync):
  """``(step, parameter counts, losses)``: ``step()`` runs ``forward(model)`` (the model's
  output, with ``.loss``), backward and the optimizer, then ``sync(device)``; each step's loss
  is appended to ``losses`` (a device tensor: reading it would synchronise)."""
  fn = torch.compile(model) if opts["compile"] else model
  autocast = opts["dtype"] == "bfloat16"
  losses = []

  def step():
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
      out = forward(fn)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    losses.append(out.loss.detach())

  counts = {
    "params_total": sum(p.numel() for p in model.parameters()),
    "params_trainable": sum(p.numel() for p in params),
  }
  return step, counts, losses
