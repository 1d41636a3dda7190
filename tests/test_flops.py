"""The low-rank path's point: a LoRA step costs about forward + input gradients, not a weight
gradient. Measured with XLA's cost analysis (FLOPs, not time)."""

import functools
import sys

import jax
import jax.numpy as jnp
from conftest import REPO
from helpers import TinyEncoder

import lora_jax
from lora_jax import LoraRule

sys.path.insert(0, str(REPO))  # bench/


def _flops(fn, *args, compiled: bool = True) -> float:
  """XLA's FLOPs of ``fn``: of the compiled program, or (``compiled=False``) of the program as
  traced, before XLA's passes, which counts every operation the code asked for and compiles
  nothing (~2 s instead of ~25 s on CPU for the five programs of ``_ratios``)."""
  lowered = jax.jit(fn).lower(*args)
  cost = (lowered.compile() if compiled else lowered).cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost["flops"])


def _ratios():
  model = TinyEncoder(layers=2, hidden=256, heads=4, ffn=1024)
  x = jax.random.normal(jax.random.key(0), (4, 64, 256))
  variables = jax.jit(model.init)(jax.random.key(1), x)  # one program, not op by op
  adapted = lora_jax.lora_init(variables, LoraRule("all-linear", rank=8), rng=jax.random.key(2))
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))

  def loss_of(apply):
    return lambda t: jnp.mean(apply(lora_jax.combine(t, frozen), x) ** 2)

  low_rank = loss_of(lora_jax.lora_apply(model.apply))
  merged = loss_of(lora_jax.lora_apply(model.apply, strategy="merge"))
  full = lambda v: jnp.mean(model.apply(v, x) ** 2)  # noqa: E731
  flops = functools.partial(_flops, compiled=False)
  forward = flops(low_rank, trainable)
  return (
    flops(jax.grad(low_rank), trainable) / forward,
    flops(jax.grad(merged), trainable) / forward,
    flops(jax.grad(full), variables) / flops(full, variables),
  )


def test_low_rank_training_step_costs_about_one_forward_plus_input_gradients():
  low_rank, merged, full = _ratios()
  assert low_rank <= 2.2, (low_rank, merged, full)
  # the alternatives form weight gradients and cost visibly more
  assert merged > low_rank + 0.4 and full > low_rank + 0.4, (low_rank, merged, full)


def _llm_step_flops(cfg) -> tuple[float, float]:
  """XLA's FLOPs of the benchmark's compiled causal-LM LoRA step (unscanned layers: XLA counts
  a scanned loop's body once), and the ``4 N T + attention`` model."""
  from bench import configs
  from bench import flops
  from bench import llm_jax

  module = llm_jax.make_module(configs.hf_config(cfg, {}), dtype=jnp.float32, scan=False)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
  trainable, frozen, tx = llm_jax.adapt(shapes, llm_jax.layouts(module), cfg, key=jax.random.key(1))
  step = llm_jax.make_step(module, tx)
  args = (trainable, jax.eval_shape(tx.init, trainable), frozen, llm_jax.batch_shapes(cfg), 0)
  return _flops(step, *args), flops.model_flops(cfg)


def test_llm_lora_step_flops_match_4nt_plus_attention():
  """The compiled LoRA step of a small Llama (r=16 on all seven linears, packed batch) costs
  4 N T + attention: forward and input gradients, no weight-sized gradient of the frozen base."""
  from bench import configs

  model = configs.Decoder("flops", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=512)
  cfg = configs.BenchConfig("flops", model, 128, 2, "lora", configs.LLM_TARGETS, 16, 32, "packed")
  xla, expected = _llm_step_flops(cfg)
  assert 0.95 < xla / expected < 1.15, (xla, expected, xla / expected)
