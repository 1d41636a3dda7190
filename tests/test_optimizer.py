"""trainable_mask / partition / combine / lora_optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import MLP

import lora_jax
from lora_jax import LoraRule


@pytest.fixture
def setup():
  model = MLP(features=(8, 8, 3))
  x = jax.random.normal(jax.random.key(0), (16, 5))
  y = jax.random.normal(jax.random.key(1), (16, 3))
  variables = model.init(jax.random.key(2), x)
  adapted = lora_jax.lora_init(variables, LoraRule(".*", rank=2), rng=jax.random.key(3))
  return model, x, y, variables, adapted


def test_mask_marks_adapters_and_extras(setup):
  *_, adapted = setup
  mask = lora_jax.trainable_mask(adapted, extra_trainable=[r"dense_2/bias"])
  names = jax.tree.leaves(lora_jax._src.paths.tree_paths(mask))
  flat = dict(zip(names, jax.tree.leaves(mask), strict=True))
  assert {p for p, m in flat.items() if m} == {
    "params/dense_0/lora_a",
    "params/dense_0/lora_b",
    "params/dense_1/lora_a",
    "params/dense_1/lora_b",
    "params/dense_2/lora_a",
    "params/dense_2/lora_b",
    "params/dense_2/bias",
  }
  with pytest.raises(ValueError, match="'classifier' matches no parameter"):
    lora_jax.trainable_mask(adapted, extra_trainable=["classifier"])


def test_partition_combine_round_trip(setup):
  *_, adapted = setup
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  assert len(jax.tree.leaves(trainable)) == 6
  assert len(jax.tree.leaves(frozen)) == 6
  chex.assert_trees_all_equal(lora_jax.combine(trainable, frozen), adapted)


def test_frozen_leaves_have_no_state_and_no_update(setup):
  model, x, y, variables, adapted = setup
  tx = lora_jax.lora_optimizer(optax.adam(1e-2), adapted, extra_trainable=["dense_2/bias"])
  state = tx.init(adapted)
  mask = lora_jax.trainable_mask(adapted, ["dense_2/bias"])
  leaves = zip(jax.tree.leaves(adapted), jax.tree.leaves(mask), strict=True)
  n_trainable = sum(leaf.size for leaf, m in leaves if m)
  n_state = sum(np.size(s) for s in jax.tree.leaves(state))
  assert n_state == 2 * n_trainable + 1  # Adam's mu and nu for trainable leaves, one count

  apply = lora_jax.lora_apply(model.apply)
  loss = lambda p: jnp.mean((apply(p, x) - y) ** 2)  # noqa: E731
  grads = jax.grad(loss)(adapted)
  updates, _ = tx.update(grads, state, adapted)
  new = optax.apply_updates(adapted, updates)
  for name in ("dense_0", "dense_1"):
    np.testing.assert_array_equal(new["params"][name]["kernel"], adapted["params"][name]["kernel"])
    np.testing.assert_array_equal(new["params"][name]["bias"], adapted["params"][name]["bias"])
  assert not np.array_equal(new["params"]["dense_2"]["bias"], adapted["params"]["dense_2"]["bias"])
  assert not np.array_equal(
    new["params"]["dense_0"]["lora_b"], adapted["params"]["dense_0"]["lora_b"]
  )


def test_training_only_the_trainable_partition_reduces_loss(setup):
  model, x, y, variables, adapted = setup
  mask = lora_jax.trainable_mask(adapted)
  trainable, frozen = lora_jax.partition(adapted, mask)
  tx = lora_jax.lora_optimizer(optax.adam(3e-2), adapted)
  state = tx.init(trainable)
  apply = lora_jax.lora_apply(model.apply)

  def loss(t):
    return jnp.mean((apply(lora_jax.combine(t, frozen), x) - y) ** 2)

  @jax.jit
  def step(t, s):
    value, g = jax.value_and_grad(loss)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, value

  first = None
  for _ in range(60):
    trainable, state, value = step(trainable, state)
    first = value if first is None else first
  assert float(loss(trainable)) < 0.7 * float(first)
  final = lora_jax.combine(trainable, frozen)
  chex.assert_trees_all_equal(jax.tree.map(lambda p, m: None if m else p, final, mask), frozen)


def test_optimizer_needs_adapters(setup):
  *_, variables, _ = setup
  with pytest.raises(ValueError, match="carry no LoRA adapters"):
    lora_jax.lora_optimizer(optax.adam(1e-3), variables)
