"""LoRA dropout masks (lora_jax/_src/dropout.py): the right rate, independent entries, the
expected output unchanged, and half of bernoulli's random-number work."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax._src import dropout


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.5, 0.9])
def test_each_entry_drops_at_the_rounded_rate(rate):
  n_rows, n_cols = 512, 1001  # an odd last axis: one word's second half is left unused per row
  keep = np.asarray(dropout.keep_mask(jax.random.key(0), rate, (n_rows, n_cols)))
  p = dropout.threshold(rate) / dropout.LEVELS
  assert abs(p - rate) < 1 / dropout.LEVELS
  n = keep.size
  sigma = np.sqrt(p * (1 - p) / n)
  assert abs((1 - keep.mean()) - p) < 5 * sigma
  # each column (first and second halves of the words alike) drops at that rate too
  per_col = 1 - keep.mean(axis=0)
  assert np.abs(per_col - p).max() < 5 * np.sqrt(p * (1 - p) / n_rows)


def test_neighbouring_entries_are_independent():
  """The two entries sharing a 32-bit word, and neighbouring rows, are dropped independently:
  P(both dropped) = p**2 within sampling error (the same 16 bits for both would give p)."""
  p_rate = 0.3
  keep = np.asarray(dropout.keep_mask(jax.random.key(1), p_rate, (1000, 1000)))
  p = dropout.threshold(p_rate) / dropout.LEVELS
  drop = ~keep
  sigma = np.sqrt(p * p * (1 - p * p) / (drop.size / 2))
  for a, b in [(drop[:, 0::2], drop[:, 1::2]), (drop[0::2], drop[1::2])]:
    assert abs((a & b).mean() - p * p) < 5 * sigma


def test_other_keys_give_other_masks_and_one_key_the_same():
  shape = (8, 64)
  k = dropout.keep_mask(jax.random.key(2), 0.5, shape)
  np.testing.assert_array_equal(k, dropout.keep_mask(jax.random.key(2), 0.5, shape))
  other = dropout.keep_mask(jax.random.key(3), 0.5, shape)
  assert (np.asarray(k) != np.asarray(other)).mean() > 0.3


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 6), (0, 3), (3, 0)])
def test_any_shape(shape):
  keep = dropout.keep_mask(jax.random.key(4), 0.5, shape)
  assert keep.shape == shape and keep.dtype == jnp.bool_


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kept_entries_are_divided_by_the_keep_probability_so_the_mean_is_kept(dtype):
  rate = 0.05
  x = jnp.full((400, 1000), 3.0, dtype)
  y = np.asarray(dropout.apply(jax.random.key(5), rate, x), np.float32)
  assert dropout.apply(jax.random.key(5), rate, x).dtype == dtype
  keep_p = 1 - dropout.threshold(rate) / dropout.LEVELS
  kept = y[y != 0]
  np.testing.assert_allclose(kept, np.float32(jnp.asarray(3.0 / keep_p, dtype)), rtol=0)
  sigma = 3.0 * np.sqrt((1 - keep_p) / keep_p / y.size)
  assert abs(y.mean() - 3.0) < 5 * sigma


def test_rate_zero_is_the_identity():
  x = jnp.arange(6.0)
  assert dropout.apply(jax.random.key(0), 0.0, x) is x


def _random_bits(jaxpr) -> int:
  """How many random bits a jaxpr draws from its keys (``random_bits`` equations)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "random_bits":
      total += int(np.prod(eqn.params["shape"])) * eqn.params["bit_width"]
    for sub in jax.core.jaxprs_in_params(eqn.params):
      total += _random_bits(sub)
  return total


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_a_mask_draws_half_the_random_bits_of_bernoulli(impl):
  """With JAX's partitionable threefry every 32-bit word drawn costs a threefry2x32 block."""
  shape = (64, 576)
  key = jax.random.key(0, impl=impl)
  ours = _random_bits(jax.make_jaxpr(lambda k: dropout.keep_mask(k, 0.05, shape))(key).jaxpr)
  bern = _random_bits(jax.make_jaxpr(lambda k: jax.random.bernoulli(k, 0.95, shape))(key).jaxpr)
  assert bern == 64 * 576 * 32
  assert ours == 64 * 576 * 16


@pytest.mark.parametrize("rate", [1e-6, 1 - 1e-6, 1.0, -0.1])
def test_rates_the_masks_cannot_express_are_refused(rate):
  with pytest.raises(ValueError, match=f"{rate!r}"):
    dropout.threshold(rate)
  with pytest.raises(ValueError, match=f"{rate!r}"):
    lora_jax.LoraRule(".*", rank=2, dropout=rate)


def test_rates_just_inside_the_stated_bounds_are_accepted():
  half_step = 0.5 / dropout.LEVELS  # 2**-17: the message's bounds
  assert dropout.threshold(half_step * 1.01) == 1
  assert dropout.threshold(1 - half_step * 1.01) == dropout.LEVELS - 1
  for rate in (half_step, 1 - half_step):
    with pytest.raises(ValueError, match=r"above 2\*\*-17 \(7.63e-06\) and below 1 - 2\*\*-17"):
      dropout.threshold(rate)
  lora_jax.LoraRule(".*", rank=2, dropout=1e-5)
