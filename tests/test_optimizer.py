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


@pytest.mark.parametrize("ratio", [16.0, 2.5])
def test_loraplus_scales_b_updates_by_the_ratio_and_leaves_the_rest_alone(ratio):
  import flax.linen as nn

  from lora_jax import LoraRule
  from lora_jax import lora_init
  from lora_jax import lora_optimizer
  from lora_jax import partition
  from lora_jax import trainable_mask

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name="b")(nn.tanh(nn.Dense(8, name="a")(x)))

  base = Net().init(jax.random.key(0), jnp.ones((1, 5)))
  # layer b with DoRA: its magnitude, a 1-D leaf, goes with B as in PEFT's LoRA+
  rules = [LoraRule(["a"], rank=2), LoraRule(["b"], rank=2, use_dora=True)]
  params = lora_init(base, rules, rng=jax.random.key(1))
  params["params"]["a"]["lora_b"] = jnp.full((2, 8), 0.1)  # non-zero, so weight decay acts
  trainable, _ = partition(params, trainable_mask(params))
  grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape) + 1.0), trainable)
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  plain, plus = (
    lora_optimizer(inner, params),
    lora_optimizer(inner, params, loraplus_lr_ratio=ratio),
  )
  s_plain, s_plus = plain.init(trainable), plus.init(trainable)
  for _ in range(2):  # steps 1 and 2: the same moments, B's step scaled
    u_plain, s_plain = plain.update(grads, s_plain, trainable)
    u_plus, s_plus = plus.update(grads, s_plus, trainable)
    for layer in ("a", "b"):
      got, want = u_plus["params"][layer], u_plain["params"][layer]
      np.testing.assert_array_equal(got["lora_a"], want["lora_a"])
      np.testing.assert_allclose(got["lora_b"], ratio * want["lora_b"], rtol=1e-6)
      assert np.abs(want["lora_b"]).max() > 0
    m_plus, m_plain = (
      u_plus["params"]["b"]["lora_magnitude"],
      u_plain["params"]["b"]["lora_magnitude"],
    )
    np.testing.assert_allclose(m_plus, ratio * m_plain, rtol=1e-6)
    assert np.abs(m_plain).max() > 0
  for bad in (0, -1.0, float("inf"), float("nan"), True, "16"):
    with pytest.raises(ValueError, match="loraplus_lr_ratio=.* must be a positive finite number"):
      lora_optimizer(inner, params, loraplus_lr_ratio=bad)
