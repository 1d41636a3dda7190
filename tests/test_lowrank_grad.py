"""The low-rank path's matmuls: gradients as the plain formula's, and no transposed copies.

``lora_apply`` computes ``s * (x @ A) @ B`` as 2-D matmuls over flattened ``[rows, k]`` views
(``low_rank.matmul``) so that XLA:CPU emits no transposed copy of an activation for the
adapters' gradients (bench/NOTES.md entry 22). These tests check that the layout work changes
no number: gradients of ``A``, ``B`` and the input equal those of the plain formula (contract
the module's own axes with ``tensordot`` / ``einsum``) under the same LoRA dropout mask, and
that the compiled gradient of a LoRA MLP holds no activation-sized copy or transpose.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraRule
from lora_jax._src import apply as apply_mod
from lora_jax._src import layouts as layouts_mod
from lora_jax._src import low_rank as low_rank_mod

# Gradient tolerance against the plain formula, per dtype (relative to the largest entry).
TOL = {jnp.float32: 1e-6, jnp.bfloat16: 2e-2}


def _plain_dense(module, x, a, b, spec, dtype):
  """``s * (x A) B`` contracting the module's own input axes where they are (no reshapes)."""
  if isinstance(module, nn.Dense):
    x_axes = (x.ndim - 1,)
  else:
    x_axes = tuple(ax % x.ndim for ax in layouts_mod.as_tuple(module.axis))
  t = jnp.tensordot(x.astype(dtype), a.astype(dtype), (x_axes, tuple(range(len(x_axes)))))
  return jnp.tensordot(t * spec.scale, b.astype(dtype), 1)


def _plain_einsum(eq, x, a, b, spec, dtype):
  """The module's equation with the kernel split into A (input letters + rank) and B."""
  lhs, rest = eq.replace(" ", "").split(",")
  rhs, out = rest.split("->")
  ins = "".join(rhs[i] for i in spec.in_axes)
  outs = "".join(rhs[o] for o in spec.out_axes)
  kept = "".join(c for c in lhs if c not in ins)
  t = jnp.einsum(f"{lhs},{ins}Z->{kept}Z", x.astype(dtype), a.astype(dtype))
  return jnp.einsum(f"{kept}Z,Z{outs}->{out}", t * spec.scale, b.astype(dtype))


class Dense3d(nn.Module):
  """Dense layers on [batch, seq, features], as in a transformer."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(24, dtype=self.dtype, name="up")(x))
    return nn.Dense(8, dtype=self.dtype, name="down")(h)


class HeadsGeneral(nn.Module):
  """DenseGeneral into heads, out of heads (two input axes), and over a middle axis."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [b, t, d]
    q = nn.DenseGeneral((2, 4), dtype=self.dtype, name="query")(x)  # [b, t, 2, 4]
    o = nn.DenseGeneral(8, axis=(-2, -1), dtype=self.dtype, name="out")(q)  # [b, t, 8]
    return nn.DenseGeneral(5, axis=1, dtype=self.dtype, name="over_t")(o)  # over t: [b, 8, 5]


class Einsums(nn.Module):
  """Einsum kernels: out of heads, a contraction that is not the last axis, an ellipsis."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [b, t, d=8]
    einsum = functools.partial(nn.Einsum, dtype=self.dtype)
    q = einsum((8, 2, 4), "btd,dhk->bthk", name="split")(x)
    m = einsum((2, 4, 8), "bthk,hkd->btd", name="mix")(q)
    s = einsum((3, 6), "bdt,tk->bkd", name="over_t")(jnp.swapaxes(m, 1, 2))  # t=3
    return einsum((8, 5), "...d,de->...e", name="ell")(s)


class Block(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(8, dtype=self.dtype, name="proj")(h)), None


class Scanned(nn.Module):
  """Three Dense layers stacked by nn.scan (stacked adapters, dropout split per layer)."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(
      Block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "lora_dropout": True},
      length=3,
    )
    return layers(dtype=self.dtype, name="layers")(x, None)[0]


class Zoo(nn.Module):
  """Every kind above on one input; one output per branch."""

  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kinds = (Dense3d, HeadsGeneral, Einsums, Scanned)
    return tuple(k(dtype=self.dtype, name=k.__name__.lower())(x) for k in kinds)


def _grads(model, adapted, x, key):
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  apply = lora_jax.lora_apply(model.apply)

  def loss(trainable, x):
    ys = apply(lora_jax.combine(trainable, frozen), x, rngs={"lora_dropout": key})
    return sum(jnp.sum(jnp.sin(y.astype(jnp.float32))) for y in ys)

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x)


@functools.cache
def _adapted():
  """Zoo's variables with random adapters (float32 parameters, whatever the compute dtype)."""
  model = Zoo()
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  adapted = lora_jax.lora_init(
    jax.jit(model.init)(jax.random.key(1), x),
    LoraRule(".*", rank=3, alpha=6.0, dropout=0.3),
    rng=jax.random.key(2),
    layouts=lora_jax.kernel_layouts(model, x),
  )
  adapted = jax.tree_util.tree_map_with_path(  # non-zero B, so that A gets a gradient
    lambda kp, v: (
      0.3 * jax.random.normal(jax.random.key(len(str(kp))), v.shape, v.dtype)
      if str(kp[-1]) in ("['lora_a']", "['lora_b']")
      else v
    ),
    adapted,
  )
  return adapted, x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_gradients_equal_the_plain_formula_with_dropout(dtype, monkeypatch):
  model = Zoo(dtype=dtype)
  adapted, x = _adapted()
  x = x.astype(dtype)
  key = jax.random.key(7)
  got_params, got_x = _grads(model, adapted, x, key)
  monkeypatch.setattr(apply_mod, "_dense_low_rank", _plain_dense)
  monkeypatch.setattr(low_rank_mod, "einsum", _plain_einsum)
  want_params, want_x = _grads(model, adapted, x, key)
  got = jax.tree_util.tree_leaves_with_path(got_params)
  want = jax.tree.leaves(want_params)
  names = [jax.tree_util.keystr(kp) for kp, _ in got]
  assert sum(n.endswith("['lora_a']") for n in names) == 10  # 2 + 3 + 4 + 1 (stacked)
  pairs = [*zip(names, [g for _, g in got], want, strict=True), ("x", got_x, want_x)]
  for name, g, w in pairs:
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(w).max() > 0, name
    np.testing.assert_allclose(g, w, atol=TOL[dtype] * np.abs(w).max(), rtol=0, err_msg=name)


def _activation_copies(hlo: str, min_elements: int) -> list[str]:
  """Copies and transposes (plain or fused) in the entry computation of at least that size."""
  entry = hlo[hlo.index("\nENTRY") :]
  found = []
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (\w+)\(", line)
    if not m:
      continue
    name, dims, op = m.groups()
    kind = name.split(".")[0]
    is_copy = op in ("copy", "transpose") or (op == "fusion" and re.search("copy|transpose", kind))
    if is_copy and np.prod([int(d) for d in dims.split(",") if d]) >= min_elements:
      found.append(line.strip()[:160])
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's dot layouts")
def test_adapter_gradients_copy_no_activation_on_cpu():
  batch, seq, dim = 4, 32, 64
  model = Dense3d()
  x = jax.random.normal(jax.random.key(0), (batch, seq, dim))
  adapted = lora_jax.lora_init(
    jax.jit(model.init)(jax.random.key(1), x), LoraRule(".*", rank=4), rng=jax.random.key(2)
  )
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))

  def loss(trainable):
    return jnp.sum(lora_jax.lora_apply(model.apply)(lora_jax.combine(trainable, frozen), x) ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(trainable).compile().as_text()
  assert hlo.count(" dot(") + hlo.count("kind=kCustom") >= 6  # the adapters' matmuls are there
  # the smallest activation is [batch * seq, 8]; the adapters' own [tokens, rank] are smaller
  assert _activation_copies(hlo, batch * seq * 8) == []
