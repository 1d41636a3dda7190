"""``unmerge``: PEFT's ``unmerge_adapter`` on merged pytrees (issue 12, item 5)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraRule
from lora_jax import lora_init
from lora_jax import merge
from lora_jax import unmerge


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(6, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))


def trained(base, seed: int):
  """``base`` with rank-4 adapters on both layers, B set non-zero "as if trained"."""
  adapted = lora_init(base, LoraRule(".*", rank=4, alpha=8), rng=jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 100), 2))
  for name in ("hidden", "out"):
    b = adapted["params"][name]["lora_b"]
    adapted["params"][name]["lora_b"] = 0.5 * jax.random.normal(next(keys), b.shape, b.dtype)
  return adapted


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_round_trip_costs_at_most_one_rounding_of_the_weights_dtype(dtype):
  base = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
  base = jax.tree.map(lambda x: x.astype(dtype), base)
  adapted = trained(base, 1)
  merged = merge(adapted)
  restored = unmerge(merged, adapted)
  assert jax.tree.structure(restored) == jax.tree.structure(base)
  eps_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
  for name in ("hidden", "out"):
    w = np.asarray(base["params"][name]["kernel"], np.float32)
    m = np.asarray(merged["params"][name]["kernel"], np.float32)
    r = restored["params"][name]["kernel"]
    assert r.dtype == dtype
    assert not np.allclose(m, w)  # the adapter did change the weight
    # one rounding: within one unit in the last place of the larger of |W| and |merged W|
    ulp = np.spacing(np.maximum(np.abs(w), np.abs(m)).astype(eps_dtype)).astype(np.float32)
    assert np.all(np.abs(np.asarray(r, np.float32) - w) <= ulp), name
    np.testing.assert_array_equal(restored["params"][name]["bias"], base["params"][name]["bias"])


def test_a_merged_model_switches_from_one_adapter_to_another():
  x = jax.random.normal(jax.random.key(3), (5, 8))
  base = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
  task_1, task_2 = trained(base, 1), trained(base, 2)
  deployed = merge(task_1)  # serving task 1
  restored = unmerge(deployed, task_1)
  on_restored = jax.tree.map(lambda v: v, task_2)  # task 2's adapters on the restored weights
  for name in ("hidden", "out"):
    on_restored["params"][name]["kernel"] = restored["params"][name]["kernel"]
  switched = merge(on_restored)
  want = lora_jax.lora_apply(MLP().apply)(task_2, x)
  np.testing.assert_allclose(MLP().apply(switched, x), want, atol=1e-5)
  assert not np.allclose(MLP().apply(deployed, x), want, atol=1e-3)


def test_bad_pairs_are_refused():
  base = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
  adapted = trained(base, 1)
  with pytest.raises(ValueError, match="adapted carries no LoRA adapters"):
    unmerge(base, base)
  with pytest.raises(ValueError, match="still carries an adapter"):
    unmerge(adapted, adapted)
  missing = {"params": {"hidden": base["params"]["hidden"]}}
  with pytest.raises(ValueError, match="merged has no module 'params/out'"):
    unmerge(missing, adapted)
  other = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
  other["params"]["out"]["kernel"] = jnp.zeros((16, 7))
  with pytest.raises(ValueError, match=r"params/out/kernel is shape \(16, 7\) in merged"):
    unmerge(other, adapted)


def test_unmerging_another_adapter_or_twice_is_refused():
  base = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
  task_1, task_2 = trained(base, 1), trained(base, 2)
  deployed = merge(task_1)
  with pytest.raises(
    ValueError,
    match=r"differ from adapted's base weights beyond rounding \(params/hidden/kernel by ",
  ):
    unmerge(deployed, task_2)  # task 1 was merged, not task 2
  restored = unmerge(deployed, task_1)
  with pytest.raises(ValueError, match="another adapter, or unmerged already"):
    unmerge(restored, task_1)
  # Merged one after another, each unmerged in turn, with the check off.
  on_1 = jax.tree.map(lambda v: v, task_2)
  for name in ("hidden", "out"):
    on_1["params"][name]["kernel"] = deployed["params"][name]["kernel"]
  both = merge(on_1)
  back = unmerge(unmerge(both, task_2, check=False), task_1)
  for name in ("hidden", "out"):
    np.testing.assert_allclose(
      back["params"][name]["kernel"], base["params"][name]["kernel"], atol=1e-5
    )


def test_the_check_holds_under_jit_without_a_concrete_base():
  base = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
  task_1 = trained(base, 1)
  restored = jax.jit(unmerge)(merge(task_1), task_1)  # traced: nothing to compare, no error
  np.testing.assert_allclose(
    restored["params"]["out"]["kernel"], base["params"]["out"]["kernel"], atol=1e-5
  )
