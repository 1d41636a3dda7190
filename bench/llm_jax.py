"""lora_jax's causal-LM LoRA step for the benchmark's LLM configurations.

One definition serves two callers: ``bench/jax_step.py`` times it on real (random) arrays, and
``bench/llm_memory.py`` compiles it on shapes alone for XLA's memory plan. The model is
``lora_jax.models.auto_model(LlamaConfig)`` with scanned layers (one layer compiled, whatever
the depth), LoRA by the configuration's rule on the frozen half (``lora_init``, ``partition``,
``lora_apply``'s low-rank path), ``lora_optimizer(optax.adamw(1e-4))``, and the mean
next-token cross-entropy of ``bench/llm_batch.py``'s targets at every position (as
transformers computes it), by the decoder's ``target_ids=`` (``fused_cross_entropy``, logits
formed ``loss_chunk`` positions at a time) or, with ``loss_chunk=0``, from the full logits and
``optax.softmax_cross_entropy_with_integer_labels``. A packed batch goes in as ``segment_ids``,
a padded one as ``attention_mask``.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import optax

import lora_jax
from bench import configs
from bench import llm_batch
from lora_jax.models import auto_model


def make_module(
  hf_config: dict, *, dtype, param_dtype=jnp.float32, remat=False, attention=None, scan=True
):
  """The Flax decoder of a ``LlamaConfig`` given as a dict (no transformers import); layers
  scanned unless ``scan=False`` (XLA's cost analysis counts a loop's body once, so FLOP counts
  need the unscanned model)."""
  return auto_model(
    types.SimpleNamespace(**hf_config),
    dtype=dtype,
    param_dtype=param_dtype,
    scan_layers=scan,
    remat=remat,
    attention_implementation=attention,
  )


def layouts(module):
  """Kernel layouts of ``module`` (stacked by the scan), for ``lora_init`` and ``quantize``."""
  return lora_jax.kernel_layouts(module, jnp.ones((1, 1), jnp.int32))


def adapt(base, layout, cfg: configs.BenchConfig, *, key, dropout: float = 0.0):
  """``(trainable, frozen, tx)``: LoRA by ``cfg`` on ``base`` (arrays or shapes)."""
  rule = lora_jax.LoraRule(list(cfg.targets), cfg.rank, alpha=cfg.alpha, dropout=dropout)
  adapted = lora_jax.lora_init(base, rule, rng=key, layouts=layout)
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  return trainable, frozen, lora_jax.lora_optimizer(optax.adamw(1e-4), adapted)


def host_batch(cfg: configs.BenchConfig, seed: int) -> dict:
  """The arrays the step reads, from ``llm_batch.make_batch`` (NumPy)."""
  b = llm_batch.make_batch(cfg.seq, cfg.batch, cfg.model.vocab, cfg.batch_kind, seed)
  mask = "segment_ids" if cfg.batch_kind == "packed" else "attention_mask"
  return {k: b[k] for k in ("input_ids", mask, "target_ids", "target_weights")}


def batch_shapes(cfg: configs.BenchConfig) -> dict:
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host_batch(cfg, 0).items()}


LOSS_CHUNK = 256  # positions whose logits exist at once (0: the full logits)


def make_step(module, tx, *, dropout_key=None, loss_chunk: int = LOSS_CHUNK):
  """``step(trainable, opt_state, frozen, batch, i) -> (trainable, opt_state, loss, i + 1)``.

  ``dropout_key``: LoRA dropout keys are folded from it with the step number ``i``.
  ``loss_chunk``: see the module docstring.
  """
  apply = lora_jax.lora_apply(module.apply)

  def loss_fn(trainable, frozen, batch, i):
    kw = {k: batch[k] for k in ("segment_ids", "attention_mask") if k in batch}
    if dropout_key is not None:
      kw.update(deterministic=False, rngs={"lora_dropout": jax.random.fold_in(dropout_key, i)})
    variables, targets = lora_jax.combine(trainable, frozen), batch["target_ids"]
    if loss_chunk:
      nll = apply(variables, batch["input_ids"], target_ids=targets, loss_chunk_size=loss_chunk,
                  **kw)  # fmt: skip
    else:
      logits = apply(variables, batch["input_ids"], **kw)
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    w = batch["target_weights"]
    return jnp.sum(nll * w) / jnp.sum(w)

  def step(trainable, opt_state, frozen, batch, i):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, i)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss, i + 1

  return step


def build(cfg: configs.BenchConfig, opts: dict, dtypes: dict, random_params, to_device):
  """``bench/jax_step.py``'s ``(step, args, counts)`` for an LLM configuration: float32
  adapters and optimizer state, the frozen base cast on the host to ``opts["base_dtype"]``."""
  module = make_module(
    opts["hf_config"], dtype=dtypes[opts["dtype"]], remat=opts["remat"],
    attention=opts["attention"],
  )  # fmt: skip
  key = jax.random.key(opts["seed"], impl=opts["prng"])
  k_init, k_lora, k_drop = jax.random.split(key, 3)
  base = random_params(jax.eval_shape(module.init, k_init, jnp.ones((1, 1), jnp.int32)),
                       opts["seed"])  # fmt: skip
  trainable, frozen, tx = adapt(base, layouts(module), cfg, key=k_lora,
                                dropout=opts["lora_dropout"])  # fmt: skip
  counts = {
    "params_total": sum(x.size for x in jax.tree.leaves((trainable, frozen))),
    "params_trainable": sum(x.size for x in jax.tree.leaves(trainable)),
  }
  trainable = to_device(trainable)
  frozen = to_device(frozen, dtypes[opts["base_dtype"]])
  batch = to_device(host_batch(cfg, opts["seed"]))
  drop = k_drop if opts["lora_dropout"] > 0 else None
  step = jax.jit(make_step(module, tx, dropout_key=drop, loss_chunk=opts["loss_chunk"]),
                 donate_argnums=(0, 1) if opts["donate"] else ())  # fmt: skip
  args = (trainable, tx.init(trainable), frozen, batch, jnp.zeros((), jnp.int32))
  return step, args, counts
