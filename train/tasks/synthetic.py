"""The seed experiment of the LoRA write-ups, end to end through lora_jax.

1. Data ``y = X @ theta`` (theta of shape (1001, 1000), 10,000 rows). Pretrain a bias-free
   linear layer with Adam until its MSE is below 1e-2.
2. Shift the task to ``theta + 1``: the frozen model's loss jumps (to about 1000).
3. Add a rank-1 adapter and train only it: the loss recovers, and ``scale * A @ B`` is the matrix
   of ones, learned with 2,001 trainable parameters against the layer's 1,001,000.

``train/run_synthetic.py`` runs it from the command line.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax


def _fit(loss_fn, params, tx, x, y, *, batch: int, steps: int, target: float, key):
  """Adam on minibatches of ``batch`` rows until the full-data loss is below ``target``.

  ``loss_fn(params, x, y)``; the data is passed in, never closed over, so XLA neither embeds
  it in the program nor constant-folds products of it.
  """

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, k, x, y):
    idx = jax.random.choice(k, x.shape[0], (batch,), replace=False)
    g = jax.grad(loss_fn)(p, x[idx], y[idx])
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  full = jax.jit(loss_fn)
  state = tx.init(params)
  for i in range(steps):
    params, state = step(params, state, jax.random.fold_in(key, i), x, y)
    if i % 25 == 24 and float(full(params, x, y)) < target:
      break
  return params, i + 1


def run(
  n_in: int = 1001,
  n_out: int = 1000,
  rows: int = 10_000,
  rank: int = 1,
  target: float = 1e-2,
  max_steps: int = 3000,
  lr: float = 1e-2,
  seed: int = 0,
  batch: int = 1000,
) -> dict:
  """Runs the three phases and returns their figures as a dict."""
  kx, kt, kinit, klora, kfit = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(kx, (rows, n_in))
  theta = jax.random.normal(kt, (n_in, n_out))
  y, y_shifted = x @ theta, x @ (theta + 1.0)
  model = nn.Dense(n_out, use_bias=False)
  apply = lora_jax.lora_apply(model.apply)

  def mse(variables, xs, ys):
    return jnp.mean((apply(variables, xs) - ys) ** 2)

  fit = functools.partial(_fit, batch=min(batch, rows), steps=max_steps, target=target, key=kfit)
  t0 = time.perf_counter()
  variables = model.init(kinit, x[:1])
  variables, pre_steps = fit(mse, variables, optax.adam(lr), x, y)
  pretrained_mse = float(mse(variables, x, y))
  shifted_mse = float(mse(variables, x, y_shifted))

  adapted = lora_jax.lora_init(variables, lora_jax.LoraRule(".*", rank=rank), rng=klora)
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  tx = lora_jax.lora_optimizer(optax.adam(lr), adapted)
  lora_mse_fn = lambda t, xs, ys: mse(lora_jax.combine(t, frozen), xs, ys)  # noqa: E731
  trainable, lora_steps = fit(lora_mse_fn, trainable, tx, x, y_shifted)
  adapted = lora_jax.combine(trainable, frozen)
  lora_mse = float(mse(adapted, x, y_shifted))
  p = adapted["params"]
  update = p["lora_spec"].scale * p["lora_a"] @ p["lora_b"]
  return {
    "pretrained_mse": pretrained_mse,
    "pretrain_steps": pre_steps,
    "shifted_mse_frozen": shifted_mse,
    "lora_mse": lora_mse,
    "lora_steps": lora_steps,
    "update_vs_ones_mae": float(jnp.mean(jnp.abs(update - 1.0))),
    "param_report": lora_jax.param_report(adapted).splitlines()[0],
    "seconds": round(time.perf_counter() - t0, 1),
  }
