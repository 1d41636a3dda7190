"""How a run forms each update (issue 27, the suite): ``train.engine.state.make_optimizer`` and
``make_schedule`` against a hand-written numpy reference, step by step.

The reference is AdamW as transformers and optax define it (decoupled weight decay on every
trainable leaf, bias-corrected moments, the schedule's value at the optimizer step before the
update), the gradients first clipped to a global norm over the trainable leaves, LoRA+ scaling
B's learning rate, and gradient accumulation averaging the micro-batch gradients before any of
it (clipping the average, not each micro-batch). Each option is on with values that make it
matter: clipping active (gradients of norm ~30 clipped to 1), weight decay large next to the
Adam step, a warmup and a decay within the steps checked.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from helpers import MLP

import lora_jax
from lora_jax import LoraRule
from train.engine import state as state_lib

B1, B2, EPS = 0.9, 0.999, 1e-8
EXTRA = ("dense_2/bias",)


@pytest.fixture(scope="module")
def params():
  model = MLP(features=(8, 8, 3))
  variables = model.init(jax.random.key(2), np.ones((2, 5), np.float32))
  adapted = lora_jax.lora_init(variables, LoraRule(".*", rank=2), rng=jax.random.key(3))
  # Non-zero B, so that weight decay moves every adapter leaf.
  return jax.tree_util.tree_map_with_path(
    lambda kp, x: x + 0.5 if "lora_b" in jax.tree_util.keystr(kp) else x, adapted
  )


def trainable_of(params):
  return lora_jax.partition(params, lora_jax.trainable_mask(params, EXTRA))[0]


def named(tree) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(kp): np.asarray(x, np.float64) for kp, x in flat}


def gradients(trainable, n: int, scale: float = 10.0) -> list[dict]:
  """``n`` random gradient trees shaped like ``trainable`` (global norm ~``3 * scale``)."""
  rng = np.random.default_rng(0)
  return [
    jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), trainable)
    for _ in range(n)
  ]


def reference(
  p0: dict,
  grads: list[dict],
  schedule,
  *,
  weight_decay: float,
  max_grad_norm: float | None,
  loraplus: float | None,
  accumulation: int,
) -> list[dict]:
  """The parameters after each optimizer step, by hand (float64)."""
  p = dict(p0)
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  out = []
  for t, first in enumerate(range(0, len(grads), accumulation)):
    group = [named(g) for g in grads[first : first + accumulation]]
    g = {k: sum(x[k] for x in group) / len(group) for k in p}  # the micro-batches' mean
    if max_grad_norm:  # clipped before Adam sees it
      norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
      if norm > max_grad_norm:
        g = {k: x * (max_grad_norm / norm) for k, x in g.items()}
    lr = float(schedule(t))
    new = {}
    for k in p:
      m[k] = B1 * m[k] + (1 - B1) * g[k]
      v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - B1 ** (t + 1)), v[k] / (1 - B2 ** (t + 1))
      rate = lr * (loraplus if loraplus and k.endswith("['lora_b']") else 1.0)
      new[k] = p[k] - rate * (m_hat / (np.sqrt(v_hat) + EPS) + weight_decay * p[k])
    p = new
    out.append(p)
  return out


def run_optimizer(params, grads, schedule, **options) -> list[dict]:
  """The parameters after each optimizer step, by ``make_optimizer`` (as ``train.engine.run``
  builds and applies it)."""
  import optax

  trainable = trainable_of(params)
  tx = state_lib.make_optimizer(params, schedule, extra_trainable=EXTRA, **options)
  opt_state = tx.init(trainable)
  k = options.get("accumulation", 1)
  out = []
  for i, g in enumerate(grads):
    updates, opt_state = tx.update(g, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    if (i + 1) % k == 0:
      out.append(named(trainable))
  return out


CASES = {
  "plain": dict(weight_decay=0.0, max_grad_norm=None, loraplus=None, accumulation=1),
  "clipped": dict(weight_decay=0.0, max_grad_norm=1.0, loraplus=None, accumulation=1),
  "weight decay": dict(weight_decay=0.5, max_grad_norm=None, loraplus=None, accumulation=1),
  "LoRA+": dict(weight_decay=0.0, max_grad_norm=None, loraplus=8.0, accumulation=1),
  "accumulated": dict(weight_decay=0.0, max_grad_norm=None, loraplus=None, accumulation=3),
  # The micro-batches' mean is under the norm for the first step, their sum and each one above it.
  "accumulated, clipped": dict(
    weight_decay=0.0, max_grad_norm=250.0, loraplus=None, accumulation=2
  ),
  "all": dict(weight_decay=0.5, max_grad_norm=1.0, loraplus=8.0, accumulation=2),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_make_optimizer_follows_the_reference_update(params, case, kind):
  o = CASES[case]
  steps = 6
  schedule = state_lib.make_schedule(kind, 0.05, steps, 2)
  grads = gradients(trainable_of(params), steps * o["accumulation"])
  # Gradients of very different sizes, so that clipping each micro-batch instead of their
  # mean, or summing instead of averaging, changes the update.
  grads = [jax.tree.map(lambda x, s=1.0 + 3.0 * i: x * s, g) for i, g in enumerate(grads)]
  want = reference(named(trainable_of(params)), grads, schedule, **o)
  got = run_optimizer(
    params,
    grads,
    schedule,
    weight_decay=o["weight_decay"],
    accumulation=o["accumulation"],
    max_grad_norm=o["max_grad_norm"],
    loraplus_lr_ratio=o["loraplus"],
  )
  assert len(got) == len(want) == steps
  for t, (a, b) in enumerate(zip(got, want, strict=True)):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-5, err_msg=f"step {t + 1} {k}")


def test_only_the_trainable_leaves_are_updated_or_decayed(params):
  """The frozen base is never given to the optimizer (``run`` partitions it off first), so no
  weight decay reaches it; each trainable leaf, the extra-trainable head too, is decayed."""
  trainable = trainable_of(params)
  names = set(named(trainable))
  assert names == {
    *(f"['params']['dense_{i}']['{ab}']" for i in range(3) for ab in ("lora_a", "lora_b")),
    "['params']['dense_2']['bias']",
  }
  zero = [jax.tree.map(np.zeros_like, trainable)]
  got = run_optimizer(
    params, zero, state_lib.make_schedule("constant", 0.1, 1, 0), weight_decay=0.5
  )[0]
  before = named(trainable)
  for k in names:  # a zero gradient: the update is the decay alone, lr * wd * p
    np.testing.assert_allclose(got[k], before[k] * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("total", "warmup"), [(10, 3), (7, 0), (5, 5)])
def test_schedules_are_transformers_curves(kind, total, warmup):
  """transformers' ``get_{linear,cosine,constant}_schedule_with_warmup``, at every step that
  forms an update (``0 .. total - 1``)."""

  def hf(step: int) -> float:
    if step < warmup:
      return step / max(1, warmup)
    if kind == "constant":
      return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
      return max(0.0, (total - step) / max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

  schedule = state_lib.make_schedule(kind, 2.0, total, warmup)
  got = [float(schedule(s)) for s in range(total)]
  np.testing.assert_allclose(got, [2.0 * hf(s) for s in range(total)], atol=1e-6)
