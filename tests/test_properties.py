"""Hypothesis: random Dense / DenseGeneral stacks, random ranks; the low-rank path equals the
dense reference and a fresh adapter changes nothing."""

import flax.linen as nn
import jax
import llm
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import lora_jax
from lora_jax import LoraRule


class Stack(nn.Module):
  widths: tuple[tuple[int, ...], ...]

  @nn.compact
  def __call__(self, x):
    for i, w in enumerate(self.widths):
      if len(w) == 1:
        x = nn.Dense(w[0], name=f"l{i}")(x)
      else:  # into heads and straight back out, as attention projections do
        x = nn.DenseGeneral(w, name=f"l{i}")(x)
        x = nn.DenseGeneral(w[0] * w[1], axis=(-2, -1), name=f"l{i}_out")(x)
    return x


layer = st.one_of(
  st.tuples(st.integers(1, 9)),
  st.tuples(st.integers(1, 3), st.integers(1, 4)),
)


@settings(max_examples=5, deadline=None)  # ~2.5 s an example on CPU; CI runs the suite each push
@given(
  widths=st.lists(layer, min_size=1, max_size=3).map(tuple),
  in_dim=st.integers(1, 7),
  rank=st.integers(1, 4),
  alpha=st.floats(0.5, 32.0),
  seed=st.integers(0, 2**16),
)
def test_low_rank_equals_dense_reference(widths, in_dim, rank, alpha, seed):
  model = Stack(widths)
  x = jax.random.normal(jax.random.key(seed), (2, in_dim))
  variables = jax.jit(model.init)(jax.random.key(seed + 1), x)  # one program, not op by op
  layouts = lora_jax.kernel_layouts(model, x)
  rule = LoraRule(".*", rank=rank, alpha=alpha)
  try:
    adapted = lora_jax.lora_init(variables, rule, rng=jax.random.key(seed + 2), layouts=layouts)
  except ValueError as e:  # only a too-large rank may be refused, and it must say so
    assert "exceeds what" in str(e)
    return
  apply = lora_jax.lora_apply(model.apply)
  np.testing.assert_array_equal(apply(adapted, x), model.apply(variables, x))
  adapted = llm.randomize_adapters(adapted, seed + 3, scale=0.1)  # numpy: nothing to compile

  # dense reference built by hand: W + scale * A @ B for every adapted kernel
  def reference(path, module):
    spec = module.get("lora_spec")
    if spec is None:
      return module
    a, b, w = module["lora_a"], module["lora_b"], module["kernel"]
    n_in = len(spec.in_axes)
    d = (a.reshape(-1, rank) @ b.reshape(rank, -1)).reshape(w.shape)
    assert d.shape[:n_in] == a.shape[:n_in]
    return {"kernel": w + spec.scale * d, "bias": module["bias"]}

  dense = {"params": lora_jax._src.paths.map_modules(reference, adapted["params"])}
  np.testing.assert_allclose(apply(adapted, x), model.apply(dense, x), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
    lora_jax.merge(adapted)["params"]["l0"]["kernel"],
    dense["params"]["l0"]["kernel"],
    atol=1e-6,
    rtol=1e-6,
  )
