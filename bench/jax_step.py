"""Worker: times lora_jax's training step for one configuration and prints one result row.

Run by ``bench/train_step.py`` in a fresh process per configuration (so the RSS peak belongs
to that configuration): ``python -m bench.jax_step '<options as JSON>'``.

The step is what a lora_jax user writes: ``partition`` the variables into the trainable half
(adapters + classifier head, or everything for full fine-tuning) and the frozen half,
differentiate only the trainable half through ``lora_apply(model.apply)`` (the low-rank path),
update it with ``lora_optimizer(optax.adamw(...))``, all under one ``jax.jit`` that donates the
trainable parameters and the optimizer state. Causal-LM configurations build theirs in
``bench/llm_jax.py``.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax
from bench import configs
from bench import flops
from bench import llm_jax
from bench import measure
from lora_jax.models import auto_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
HEAD = "classifier"  # trained in full beside the adapters, as in GLUE fine-tuning


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _to_device(tree, float_dtype=None):
  """Host (NumPy) leaves -> device arrays, floating leaves cast on the host to ``float_dtype``.

  Casting before the transfer keeps a float32 copy of the frozen weights off the device, so
  the GPU's lifetime ``peak_bytes_in_use`` is not inflated by the set-up.
  """

  def put(x):
    if float_dtype is not None and np.issubdtype(np.asarray(x).dtype, np.floating):
      x = np.asarray(x).astype(float_dtype)
    return jax.device_put(x)

  return jax.tree.map(put, tree)


def random_params(shapes, seed: int):
  """Host (NumPy) parameters of the given shapes, without compiling ``model.init``: LayerNorm
  scales 1, biases 0, every other weight ``N(0, 0.02^2)`` as RoBERTa initialises. Step time
  does not depend on the values."""
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    return (rng.standard_normal(leaf.shape, np.float32) * 0.02).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def build(cfg: configs.BenchConfig, opts: dict):
  """The jitted step, its initial arguments, and the parameter counts."""
  if cfg.is_llm:
    return llm_jax.build(cfg, opts, DTYPES, random_params, _to_device)
  hf = types.SimpleNamespace(**opts["hf_config"])  # a RobertaConfig's fields (configs.hf_config)
  model = auto_model(
    hf,
    "sequence-classification",
    dtype=DTYPES[opts["dtype"]],
    remat=opts["remat"],
    attention_implementation=opts["attention"],
  )
  key = jax.random.key(opts["seed"], impl=opts["prng"])  # the PRNG behind dropout masks
  k_ids, k_lab, k_init, k_lora, k_drop = jax.random.split(key, 5)
  ids = jax.random.randint(k_ids, (cfg.batch, cfg.seq), 5, cfg.model.vocab)
  batch = {
    "input_ids": ids,
    "attention_mask": jnp.ones_like(ids),
    "labels": jax.random.randint(k_lab, (cfg.batch,), 0, cfg.model.labels),
  }
  variables = random_params(jax.eval_shape(model.init, k_init, ids[:1]), opts["seed"])
  if cfg.mode == "lora":
    rule = lora_jax.LoraRule(
      list(cfg.targets), configs.RANK, alpha=configs.ALPHA, dropout=opts["lora_dropout"]
    )
    variables = lora_jax.lora_init(variables, rule, rng=k_lora)
    mask = lora_jax.trainable_mask(variables, [HEAD])
    tx = lora_jax.lora_optimizer(optax.adamw(1e-4), variables, [HEAD])
    apply = lora_jax.lora_apply(model.apply)
  else:
    mask = jax.tree.map(lambda _: True, variables)
    tx = optax.adamw(1e-4)
    apply = model.apply
  trainable, frozen = lora_jax.partition(variables, mask)
  trainable = _to_device(trainable)
  frozen = _to_device(frozen, DTYPES[opts["base_dtype"]])

  def loss_fn(trainable, frozen, batch, i):
    k_hidden, k_adapter = jax.random.split(jax.random.fold_in(k_drop, i))
    logits = apply(
      lora_jax.combine(trainable, frozen),
      batch["input_ids"],
      attention_mask=batch["attention_mask"],
      deterministic=False,
      rngs={"dropout": k_hidden, "lora_dropout": k_adapter},
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1) if opts["donate"] else ())
  def step(trainable, opt_state, frozen, batch, i):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, i)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss, i + 1

  args = (trainable, tx.init(trainable), frozen, batch, jnp.zeros((), jnp.int32))
  counts = {"params_total": _size(variables), "params_trainable": _size(trainable)}
  return step, args, counts


def _xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def _xla_step_gib(compiled) -> float | None:
  """XLA's buffer plan for the step: arguments + outputs - donated aliases + temporaries.

  (``peak_memory_in_bytes`` is not used: on XLA:CPU it reports the arguments alone.)
  """
  try:
    m = compiled.memory_analysis()
    total = (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
    )
  except Exception:  # not every backend / version reports it
    return None
  return total / measure.GIB


def run(opts: dict) -> dict:
  """Builds, compiles, warms up and times one configuration; returns its row."""
  cfg = configs.CONFIGS[opts["config"]]
  device = jax.devices()[0]
  base_rss = measure.rss_gib()
  step, args, counts = build(cfg, opts)
  t0 = time.perf_counter()
  compiled = step.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  trainable, opt_state, frozen, batch, i = args
  del args
  state = {"t": trainable, "o": opt_state, "i": i}
  del trainable, opt_state
  losses = []

  def one():
    t, o, loss, nxt = compiled(state["t"], state["o"], frozen, batch, state["i"])
    jax.block_until_ready((t, o, loss))
    state.update(t=t, o=o, i=nxt)
    losses.append(loss)

  measure.time_steps(one, opts["warmup"])
  setup_peak = measure.peak_rss_gib()
  measure.trim_heap()
  measure.reset_peak_rss()
  baton = measure.Baton(opts["lockstep"])
  baton.ready()
  times = measure.time_steps(one, opts["steps"], baton)
  stats = device.memory_stats() or {}
  model_flops = flops.model_flops(cfg)
  row = measure.summarize(times, cfg.tokens)
  med_s = row["step_ms"] / 1e3
  xla = _xla_flops(compiled)
  if cfg.is_llm:  # scanned layers: XLA's cost analysis counts a loop's body once, not per layer
    xla = None  # (tests/test_flops.py checks the LLM step's count on unscanned layers)
  peak_rss = measure.peak_rss_gib()
  on_device = "peak_bytes_in_use" in stats
  return {
    **row,
    "compile_s": round(compile_s, 2),
    "peak_mem_gib": measure.rounded(
      stats["peak_bytes_in_use"] / measure.GIB if on_device else peak_rss
    ),
    "mem_source": "device peak_bytes_in_use" if on_device else "process RSS, timed steps",
    "xla_step_gib": measure.rounded(_xla_step_gib(compiled)),
    "rss_base_gib": measure.rounded(base_rss),
    "rss_setup_peak_gib": measure.rounded(setup_peak),
    "rss_step_peak_gib": measure.rounded(peak_rss),
    **counts,
    "model_flops": model_flops,
    "xla_flops": xla,
    "xla_over_model_flops": None if xla is None else round(xla / model_flops, 3),
    "model_tflops_per_s": round(model_flops / med_s / 1e12, 4),
    "mfu": round(model_flops / med_s / (opts["peak_tflops"] * 1e12), 4)
    if opts["peak_tflops"]
    else None,
    "final_loss": float(losses[-1]) if losses else None,
    "device": f"{device.platform}: {device.device_kind}",
    "versions": {
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "lora_jax": lora_jax.__version__,
    },
  }


def main(argv: list[str]) -> None:
  opts = json.loads(argv[0])
  cfg = configs.CONFIGS[opts["config"]]
  row = {
    "side": "lora_jax",
    "impl": "jit",
    "config": cfg.name,
    "mode": cfg.mode,
    "targets": list(cfg.targets) if cfg.targets else None,
    "seq": cfg.seq,
    "batch": cfg.batch,
    "tokens": cfg.tokens,
    "batch_kind": cfg.batch_kind,
    **{k: opts.get(k) for k in configs.ROW_OPTIONS},
    "attn_dropout": 0.0,  # jax.nn.dot_product_attention has no attention-probability dropout
  }
  try:
    row.update(run(opts))
  except Exception as e:  # report the failure as a row (e.g. out of memory) and go on
    measure.fail(row, e)
  measure.emit(row)


if __name__ == "__main__":
  main(sys.argv[1:])
