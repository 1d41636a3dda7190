"""lora_init / lora_apply / merge against the dense reference W + s*A@B."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from helpers import MLP
from helpers import ConvNet
from helpers import Heads
from helpers import TiedLM
from helpers import adapter_paths
from helpers import randomize_adapters

import lora_jax
from lora_jax import LoraRule

# Tolerance of the low-rank path against the merged model, per base dtype.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _mlp(dtype, x_dim=12):
  model = MLP(features=(16, 16, 4), dtype=dtype, param_dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (3, x_dim))
  return model, model.init(jax.random.key(1), x), x


class LowRankPathTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rank=(1, 4), dtype=tuple(DTYPES))
  def test_fresh_adapter_is_bit_identical(self, rank, dtype):
    model, variables, x = _mlp(DTYPES[dtype])
    adapted = lora_jax.lora_init(variables, LoraRule(".*", rank=rank), rng=jax.random.key(2))
    base = self.variant(model.apply)(variables, x)
    out = self.variant(lora_jax.lora_apply(model.apply))(adapted, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rank=(1, 4), dtype=tuple(DTYPES))
  def test_low_rank_path_equals_merged_model(self, rank, dtype):
    model, variables, x = _mlp(DTYPES[dtype])
    adapted = lora_jax.lora_init(
      variables, LoraRule(".*", rank=rank, alpha=2.0 * rank), rng=jax.random.key(2)
    )
    adapted = randomize_adapters(adapted, jax.random.key(3))
    out = self.variant(lora_jax.lora_apply(model.apply))(adapted, x)
    merged = lora_jax.merge(adapted)
    chex.assert_trees_all_equal_shapes_and_dtypes(merged, variables)
    ref = model.apply(merged, x)
    chex.assert_trees_all_close(out, ref, atol=TOL[DTYPES[dtype]], rtol=TOL[DTYPES[dtype]])
    # and the merge strategy is the same function
    via_merge = self.variant(lora_jax.lora_apply(model.apply, strategy="merge"))(adapted, x)
    chex.assert_trees_all_close(via_merge, ref, atol=TOL[DTYPES[dtype]])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(rank=(2, 4), dtype=tuple(DTYPES))
  def test_gradients_reach_every_adapter(self, rank, dtype):
    model, variables, x = _mlp(DTYPES[dtype])
    adapted = randomize_adapters(
      lora_jax.lora_init(variables, LoraRule(".*", rank=rank), rng=jax.random.key(2)),
      jax.random.key(3),
    )
    trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
    apply = lora_jax.lora_apply(model.apply)

    def loss(t):
      return jnp.mean(apply(lora_jax.combine(t, frozen), x).astype(jnp.float32) ** 2)

    grads = self.variant(jax.grad(loss))(trainable)
    self.assertEqual(adapter_paths(grads), adapter_paths(adapted))
    self.assertLen(adapter_paths(grads), 6)
    for g in jax.tree.leaves(grads):
      chex.assert_tree_all_finite(g)
      self.assertEqual(g.dtype, jnp.float32)
      self.assertGreater(float(jnp.abs(g).max()), 0.0)


def test_adapter_leaves_are_float32_and_input_untouched():
  model, variables, x = _mlp(jnp.bfloat16)
  before = jax.tree.map(np.asarray, variables)
  adapted = lora_jax.lora_init(
    variables, LoraRule(["dense_0", "dense_2"], rank=3), rng=jax.random.key(0)
  )
  chex.assert_trees_all_equal(variables, before)
  p = adapted["params"]
  assert set(p["dense_1"]) == {"kernel", "bias"}
  assert p["dense_0"]["lora_a"].shape == (12, 3) and p["dense_0"]["lora_b"].shape == (3, 16)
  assert p["dense_0"]["lora_a"].dtype == jnp.float32 and p["dense_2"]["lora_b"].dtype == jnp.float32
  assert not p["dense_0"]["lora_b"].any()


def test_bare_params_tree_and_variables_dict_agree():
  model, variables, x = _mlp(jnp.float32)
  rule = LoraRule("params/dense_1", rank=2)
  a = lora_jax.lora_init(variables, rule, rng=jax.random.key(0))
  b = lora_jax.lora_init(variables["params"], rule, rng=jax.random.key(0))
  chex.assert_trees_all_equal(a["params"], b)
  assert set(lora_jax.merge(b)) == set(variables["params"])


def test_scale_and_rslora_are_used_by_merge():
  model, variables, x = _mlp(jnp.float32)
  for rslora, scale in ((False, 16 / 4), (True, 16 / 2)):
    adapted = randomize_adapters(
      lora_jax.lora_init(
        variables, LoraRule(["dense_0"], rank=4, alpha=16, rslora=rslora), rng=jax.random.key(0)
      ),
      jax.random.key(1),
    )
    m = adapted["params"]["dense_0"]
    want = variables["params"]["dense_0"]["kernel"] + scale * m["lora_a"] @ m["lora_b"]
    got = lora_jax.merge(adapted)["params"]["dense_0"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_unload_gives_back_the_base_weights():
  model, variables, x = _mlp(jnp.float32)
  adapted = randomize_adapters(
    lora_jax.lora_init(variables, LoraRule(".*", rank=2), rng=jax.random.key(0)),
    jax.random.key(1),
  )
  chex.assert_trees_all_equal(lora_jax.unload(adapted), variables)
  chex.assert_trees_all_equal(lora_jax.unload(adapted["params"]), variables["params"])
  # dropped, not merged: the base model's outputs, not the adapted ones
  np.testing.assert_array_equal(model.apply(lora_jax.unload(adapted), x), model.apply(variables, x))
  assert not np.allclose(model.apply(lora_jax.merge(adapted), x), model.apply(variables, x))


def test_first_matching_rule_wins():
  model, variables, x = _mlp(jnp.float32)
  rules = [LoraRule(["dense_1"], rank=2), LoraRule(".*", rank=3)]
  p = lora_jax.lora_init(variables, rules, rng=jax.random.key(0))["params"]
  assert p["dense_1"]["lora_spec"].rank == 2
  assert p["dense_0"]["lora_spec"].rank == 3 and p["dense_2"]["lora_spec"].rank == 3


def test_dense_general_einsum_need_layouts_then_match_merged():
  model = Heads()
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  variables = model.init(jax.random.key(1), x)
  with pytest.raises(
    ValueError, match=r"params/query/kernel has shape \(8, 2, 4\).*kernel_layouts"
  ):
    lora_jax.lora_init(variables, LoraRule(["query"], rank=2), rng=jax.random.key(2))
  layouts = lora_jax.kernel_layouts(model, x)
  assert layouts["params/query"] == lora_jax.KernelLayout((0,), (1, 2), "dense")
  assert layouts["params/out"] == lora_jax.KernelLayout((0, 1), (2,), "dense")
  assert layouts["params/mix"] == lora_jax.KernelLayout((0, 1), (2,), "einsum")
  adapted = lora_jax.lora_init(
    variables, LoraRule(".*", rank=3), rng=jax.random.key(2), layouts=layouts
  )
  assert adapted["params"]["query"]["lora_b"].shape == (3, 2, 4)
  assert adapted["params"]["out"]["lora_a"].shape == (2, 4, 3)
  adapted = randomize_adapters(adapted, jax.random.key(3))
  out = lora_jax.lora_apply(model.apply)(adapted, x)
  ref = model.apply(lora_jax.merge(adapted), x)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert float(jnp.abs(ref - model.apply(variables, x)).max()) > 1e-3


def test_wrong_layout_is_refused_at_apply():
  model = Heads()
  x = jnp.ones((1, 2, 8))
  variables = model.init(jax.random.key(1), x)
  wrong = {"params/query": lora_jax.KernelLayout((0, 1), (2,), "dense")}
  adapted = lora_jax.lora_init(
    variables, LoraRule(["query"], rank=2), rng=jax.random.key(0), layouts=wrong
  )
  with pytest.raises(ValueError, match="params/query.*splits its weight"):
    lora_jax.lora_apply(model.apply)(adapted, x)


def test_einsum_that_cannot_be_split_is_a_clear_error():
  class Batched(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((2, 4, 5), "bhd,hdk->bhk", name="e")(x)

  x = jnp.ones((3, 2, 4))
  model = Batched()
  variables = model.init(jax.random.key(0), x)
  assert "params/e" not in lora_jax.kernel_layouts(model, x)
  with pytest.raises(ValueError, match="kernel_layouts"):
    lora_jax.lora_init(variables, LoraRule(["e"], rank=1), rng=jax.random.key(0))


def test_conv_low_rank_matches_merged():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = model.init(jax.random.key(1), x)
  layouts = lora_jax.kernel_layouts(model, x)
  adapted = randomize_adapters(
    lora_jax.lora_init(variables, LoraRule(".*", rank=2), rng=jax.random.key(2), layouts=layouts),
    jax.random.key(3),
  )
  assert adapted["params"]["conv"]["lora_a"].shape == (3, 3, 3, 2)
  assert adapted["params"]["conv"]["lora_b"].shape == (2, 6)
  out = lora_jax.lora_apply(model.apply)(adapted, x)
  np.testing.assert_allclose(out, model.apply(lora_jax.merge(adapted), x), atol=1e-5, rtol=1e-5)


def test_embed_call_and_attend_match_merged():
  model = TiedLM()
  ids = jnp.array([[1, 2, 3, 10], [0, 5, 5, 4]])
  variables = model.init(jax.random.key(1), ids)
  fresh = lora_jax.lora_init(variables, LoraRule(["embed"], rank=2), rng=jax.random.key(2))
  # PEFT's embedding init: A zero, B random; the product is still zero.
  assert not fresh["params"]["embed"]["lora_a"].any() and fresh["params"]["embed"]["lora_b"].any()
  np.testing.assert_array_equal(
    lora_jax.lora_apply(model.apply)(fresh, ids), model.apply(variables, ids)
  )
  adapted = randomize_adapters(fresh, jax.random.key(3))
  out = lora_jax.lora_apply(model.apply)(adapted, ids)
  np.testing.assert_allclose(out, model.apply(lora_jax.merge(adapted), ids), atol=1e-5, rtol=1e-5)


def test_lora_dropout_uses_its_own_stream_and_is_off_when_deterministic():
  model, variables, x = _mlp(jnp.float32)
  adapted = randomize_adapters(
    lora_jax.lora_init(variables, LoraRule(".*", rank=4, dropout=0.5), rng=jax.random.key(0)),
    jax.random.key(1),
  )
  apply = lora_jax.lora_apply(model.apply)
  plain = apply(adapted, x)
  k1 = apply(adapted, x, rngs={"lora_dropout": jax.random.key(5)})
  k1_again = apply(adapted, x, rngs={"lora_dropout": jax.random.key(5)})
  k2 = apply(adapted, x, rngs={"lora_dropout": jax.random.key(6)})
  np.testing.assert_array_equal(k1, k1_again)
  assert float(jnp.abs(k1 - plain).max()) > 1e-4
  assert float(jnp.abs(k1 - k2).max()) > 1e-4
  # another stream (the model's own "dropout") does not switch LoRA dropout on
  np.testing.assert_array_equal(apply(adapted, x, rngs={"dropout": jax.random.key(5)}), plain)


def test_lora_dropout_off_with_deterministic_kwarg():
  class WithDet(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=True):
      return nn.Dense(4, name="d")(x)

  model = WithDet()
  x = jnp.ones((2, 6))
  adapted = randomize_adapters(
    lora_jax.lora_init(
      model.init(jax.random.key(0), x), LoraRule(".*", rank=2, dropout=0.5), rng=jax.random.key(0)
    ),
    jax.random.key(1),
  )
  apply = lora_jax.lora_apply(model.apply)
  rngs = {"lora_dropout": jax.random.key(5)}
  np.testing.assert_array_equal(apply(adapted, x, deterministic=True, rngs=rngs), apply(adapted, x))
  assert (
    float(jnp.abs(apply(adapted, x, deterministic=False, rngs=rngs) - apply(adapted, x)).max()) > 0
  )


def test_unsupported_module_with_adapter_is_refused_by_low_rank_path():
  class Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))
      return x @ k

  model = Custom()
  x = jnp.ones((2, 5))
  adapted = lora_jax.lora_init(
    model.init(jax.random.key(0), x), LoraRule(".*", rank=1), rng=jax.random.key(0)
  )
  with pytest.raises(ValueError, match="Custom.*strategy='merge'"):
    lora_jax.lora_apply(model.apply)(adapted, x)
  adapted = randomize_adapters(adapted, jax.random.key(1))
  out = lora_jax.lora_apply(model.apply, strategy="merge")(adapted, x)
  np.testing.assert_allclose(out, model.apply(lora_jax.merge(adapted), x), rtol=1e-6)


class ErrorsTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.model, self.variables, self.x = _mlp(jnp.float32)

  def test_rule_matching_nothing_lists_closest_paths(self):
    with self.assertRaisesRegex(ValueError, r"'dense_9'.*matches no module.*params/dense_\d"):
      lora_jax.lora_init(self.variables, LoraRule(["dense_9"], rank=2), rng=jax.random.key(0))
    with self.assertRaisesRegex(ValueError, r"'qkv'.*matches no module"):
      lora_jax.lora_init(
        self.variables, LoraRule(["dense_0", "qkv"], rank=2), rng=jax.random.key(0)
      )

  def test_rank_larger_than_weight(self):
    with self.assertRaisesRegex(
      ValueError,
      r"rank 17 .*params/dense_2/kernel of shape \(16, 4\).*max\(inputs=16, outputs=4\) = 16",
    ):
      lora_jax.lora_init(self.variables, LoraRule(["dense_2"], rank=17), rng=jax.random.key(0))
    # a rank between min and max is accepted (the LoRA write-ups use r=32 on a 128 -> 10 head)
    lora_jax.lora_init(self.variables, LoraRule(["dense_2"], rank=16), rng=jax.random.key(0))

  def test_matched_module_without_weight(self):
    v = {"params": {"norm": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}}
    with self.assertRaisesRegex(
      ValueError, r"'params/norm'.*no supported weight.*\['scale', 'bias'\]"
    ):
      lora_jax.lora_init(v, LoraRule(["norm"], rank=1), rng=jax.random.key(0))

  def test_adapting_twice(self):
    once = lora_jax.lora_init(self.variables, LoraRule(["dense_0"], rank=1), rng=jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "already has an adapter"):
      lora_jax.lora_init(once, LoraRule(["dense_0"], rank=1), rng=jax.random.key(0))

  def test_merge_names_non_finite_leaf(self):
    adapted = lora_jax.lora_init(
      self.variables, LoraRule(["dense_1"], rank=1), rng=jax.random.key(0)
    )
    bad = jax.tree.map(lambda x: x, adapted)
    bad["params"]["dense_1"]["lora_b"] = jnp.full((1, 16), jnp.inf)
    with self.assertRaisesRegex(FloatingPointError, "params/dense_1/kernel"):
      lora_jax.merge(bad)

  def test_bad_strategy(self):
    with self.assertRaisesRegex(
      ValueError, r"strategy='fast' is not one of \['low_rank', 'merge'\]"
    ):
      lora_jax.lora_apply(self.model.apply, strategy="fast")

  def test_bad_rules_argument(self):
    with self.assertRaisesRegex(TypeError, "LoraRule"):
      lora_jax.lora_init(self.variables, ["dense_0"], rng=jax.random.key(0))


def test_works_under_eval_shape_without_allocating():
  model, _, x = _mlp(jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  adapted = lora_jax.lora_init(shapes, LoraRule(".*", rank=2), rng=jax.random.key(0))
  assert isinstance(adapted["params"]["dense_0"]["lora_a"], jax.ShapeDtypeStruct)
  traced = jax.eval_shape(
    lambda v: lora_jax.lora_init(v, LoraRule(".*", rank=2), rng=jax.random.key(0)), shapes
  )
  chex.assert_trees_all_equal_shapes_and_dtypes(adapted, traced)


def test_lora_dropout_drops_the_adapter_input_and_rescales_what_it_keeps():
  """With A = I and an invertible B, the adapter's contribution ``s * ((mask * x / (1-p)) @ A)
  @ B`` gives back what reached A: each input entry either dropped or scaled by ``1/(1-p)``.
  Dropping the output instead, or forgetting the rescale, gives something else."""
  n, p, scale = 16, 0.25, 2.0
  model = nn.Dense(n, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (64, n))
  variables = model.init(jax.random.key(1), x)
  params = lora_jax.lora_init(
    variables, LoraRule(".*", rank=n, alpha=scale * n, dropout=p), rng=jax.random.key(2)
  )
  b = np.eye(n, dtype=np.float32) + 0.3 * np.random.RandomState(0).randn(n, n).astype(np.float32)
  params["params"]["lora_a"] = jnp.eye(n)
  params["params"]["lora_b"] = jnp.asarray(b)
  out = lora_jax.lora_apply(model.apply)(params, x, rngs={"lora_dropout": jax.random.key(3)})
  reached = np.asarray(out - model.apply(variables, x)) / scale @ np.linalg.inv(b)
  kept = np.abs(reached) > 1e-3
  np.testing.assert_allclose(reached[kept], np.asarray(x)[kept] / (1 - p), rtol=1e-3)
  np.testing.assert_allclose(reached[~kept], 0.0, atol=1e-3)
  assert 0.15 < 1 - kept.mean() < 0.35  # about p of the entries dropped


@pytest.mark.parametrize("rank", [1, 4])
def test_bfloat16_adapter_contribution_is_accurate_relative_to_its_size(rank):
  """bf16 base: the adapter's effect ``out - base`` against the float32 ``s * x @ A @ B``,
  relatively (2e-2: bf16 rounds at 2^-9; a wrong scale is off by 50% or more)."""
  model = nn.Dense(32, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (16, 24)).astype(jnp.bfloat16)
  variables = model.init(jax.random.key(1), x)
  rule = LoraRule(".*", rank=rank, alpha=3.0 * rank)
  params = randomize_adapters(
    lora_jax.lora_init(variables, rule, rng=jax.random.key(2)), jax.random.key(3), scale=1.0
  )
  out = lora_jax.lora_apply(model.apply)(params, x).astype(jnp.float32)
  effect = out - model.apply(variables, x).astype(jnp.float32)
  a, b = params["params"]["lora_a"], params["params"]["lora_b"]
  ref = 3.0 * (x.astype(jnp.float32) @ a @ b)
  assert float(jnp.linalg.norm(ref)) > 0.5 * float(jnp.linalg.norm(out))  # an effect that matters
  assert float(jnp.linalg.norm(effect - ref) / jnp.linalg.norm(ref)) < 2e-2


class _BatchDims(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral(features=4, axis=-1, batch_dims=(0,), name="bd")(x)


class _Grouped(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (3, 3), feature_group_count=2, name="conv")(x)


@pytest.mark.parametrize(
  "model,x,reason",
  [
    (_BatchDims(), jnp.ones((2, 3, 5)), r"nn.DenseGeneral with batch_dims=\(0,\) is not supported"),
    (_Grouped(), jnp.ones((1, 8, 8, 4)), "nn.Conv with feature_group_count=2 is not supported"),
  ],
)
def test_documented_refusals_name_their_reason(model, x, reason):
  variables = model.init(jax.random.key(0), x)
  layouts = lora_jax.kernel_layouts(model, x)
  assert not layouts and len(layouts.refused) == 1
  with pytest.raises(
    ValueError, match=f"matched rule '.\\*' but cannot carry an adapter: {reason}"
  ):
    lora_jax.lora_init(variables, LoraRule(".*", rank=2), rng=jax.random.key(1), layouts=layouts)


def test_batch_dims_adapter_forced_by_hand_is_refused_at_apply():
  model, x = _BatchDims(), jnp.ones((2, 3, 5))
  forced = {"params/bd": lora_jax.KernelLayout((0,), (1,), "dense", stacked=1)}
  params = lora_jax.lora_init(
    model.init(jax.random.key(0), x), LoraRule(".*", rank=2), rng=jax.random.key(1),
    layouts=forced,
  )  # fmt: skip
  with pytest.raises(ValueError, match="batch_dims=.* is not supported by LoRA; use lora_apply"):
    lora_jax.lora_apply(model.apply)(params, x)


@pytest.mark.parametrize("init", ["gaussian", "kaiming_uniform"])
def test_initial_factors_follow_their_distribution(init):
  """A ~ N(0, 1/r^2) (PEFT's "gaussian") or U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's Linear
  default, PEFT's init_lora_weights=True); B = 0. Embeddings, as in PEFT: A = 0, B ~ N(0, 1).
  Stacked (scanned) weights use one layer's fan-in."""
  rank, fan_in = 8, 512
  variables = {
    "params": {
      "dense": {"kernel": jnp.zeros((fan_in, 256))},
      "stacked": {"kernel": jnp.zeros((4, fan_in, 256))},
      "embed": {"embedding": jnp.zeros((1000, 64))},
    }
  }
  layouts = {"params/stacked": lora_jax.KernelLayout((0,), (1,), "dense", stacked=1)}
  params = lora_jax.lora_init(
    variables, LoraRule(".*", rank=rank, init=init), rng=jax.random.key(0), layouts=layouts
  )["params"]
  for name in ("dense", "stacked"):
    a, b = np.asarray(params[name]["lora_a"]), np.asarray(params[name]["lora_b"])
    assert not b.any() and abs(a.mean()) < 0.05 * a.std()
    if init == "gaussian":
      assert a.std() == pytest.approx(1 / rank, rel=0.05)
    else:
      bound = 1 / np.sqrt(fan_in)
      assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
      assert a.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
  a, b = np.asarray(params["embed"]["lora_a"]), np.asarray(params["embed"]["lora_b"])
  assert not a.any() and b.std() == pytest.approx(1.0, rel=0.05)


class _AttentionBlock(nn.Module):
  """flax's own attention (DenseGeneral q/k/v [in, heads, dim], out [heads, dim, out]) + MLP."""

  @nn.compact
  def __call__(self, x):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(x)
    return nn.Dense(4, name="head")(nn.relu(nn.Dense(16, name="up")(x)))


def test_all_linear_never_skips_a_multi_axis_kernel_silently():
  model, x = _AttentionBlock(), jnp.ones((1, 3, 8))
  base = model.init(jax.random.key(0), x)
  with pytest.raises(
    ValueError, match=r"'all-linear'.*params/attn/key/kernel \(8, 2, 4\).*kernel_layouts"
  ):
    lora_jax.lora_init(base, LoraRule("all-linear", rank=2), rng=jax.random.key(1))
  layouts = lora_jax.kernel_layouts(model, x)
  adapted = lora_jax.lora_init(
    base, LoraRule("all-linear", rank=2), rng=jax.random.key(1), layouts=layouts
  )
  modules = sorted({p.rsplit("/", 1)[0] for p in adapter_paths(adapted)})
  assert modules == [f"params/attn/{n}" for n in ("key", "out", "query", "value")] + [
    "params/head",
    "params/up",
  ]
  # excluding the attention kernels is the other way to say what all-linear should reach
  mlp_only = lora_jax.lora_init(
    base, LoraRule("all-linear", rank=2, exclude="params/attn/.*"), rng=jax.random.key(1)
  )
  assert sorted({p.rsplit("/", 1)[0] for p in adapter_paths(mlp_only)}) == [
    "params/head",
    "params/up",
  ]


def test_all_linear_on_scanned_layers_names_the_layouts():
  stacked = {"params": {"layers": {"dense": {"kernel": jnp.ones((3, 8, 8))}}}}
  with pytest.raises(ValueError, match=r"params/layers/dense/kernel \(3, 8, 8\).*scanned layers"):
    lora_jax.lora_init(stacked, LoraRule("all-linear", rank=2), rng=jax.random.key(1))


def test_stacking_orders_layers_by_number_not_as_strings():
  """With 11 or more layers "10" sorts before "2" as a string: a scanned model would get its
  layers (and PEFT adapters imported into it) in the wrong order."""
  tree = {"layers": {str(i): {"w": np.full((2,), i, np.float32)} for i in range(12)}}
  stacked = lora_jax.stack_layers(tree, "layers")
  np.testing.assert_array_equal(stacked["layers"]["w"][:, 0], np.arange(12))
  back = lora_jax.unstack_layers(stacked, "layers")
  assert [float(back["layers"][str(i)]["w"][0]) for i in range(12)] == list(range(12))
