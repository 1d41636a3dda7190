"""Small Flax models and tree utilities shared by the tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax._src import paths

# A tiny random BERT for parity tests against transformers and PEFT (transformers.BertConfig
# keyword arguments).
TINY_BERT = dict(
  vocab_size=99,
  hidden_size=32,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=64,
  max_position_embeddings=32,
  num_labels=3,
)


class MLP(nn.Module):
  features: tuple[int, ...] = (16, 16, 4)
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(x)
      if i + 1 < len(self.features):
        x = nn.relu(x)
    return x


class Heads(nn.Module):
  """Attention-style projections: DenseGeneral into heads and back out of them."""

  heads: int = 2
  head_dim: int = 4
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)
    e = nn.Einsum((self.heads, self.head_dim, self.hidden), "bthd,hdk->btk", name="mix")(q)
    return nn.DenseGeneral(self.hidden, axis=(-2, -1), name="out")(q) + e


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), padding="SAME", name="conv")(x)
    return nn.Conv(5, (2, 2), strides=2, padding="VALID", name="conv2")(nn.relu(x))


class TiedLM(nn.Module):
  vocab: int = 11
  dim: int = 6

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(self.vocab, self.dim, name="embed")
    h = nn.Dense(self.dim, name="hidden")(embed(ids))
    return embed.attend(h)


def randomize_adapters(params, key, scale=0.1):
  """Makes every ``lora_b`` (and ``lora_a``) non-zero so that adapters change outputs."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for (kp, leaf), k in zip(leaves, keys, strict=True):
    name = paths.keypath_str(kp).rsplit("/", 1)[-1]
    if name in ("lora_a", "lora_b"):
      leaf = scale * jax.random.normal(k, leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def adapter_paths(tree) -> list[str]:
  return [
    p
    for p in jax.tree.leaves(paths.tree_paths(tree))
    if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")
  ]


class TinyEncoder(nn.Module):
  """A BERT-shaped encoder from plain nn.Dense layers (q, k, v, attention output, FFN)."""

  layers: int = 2
  hidden: int = 64
  heads: int = 4
  ffn: int = 256

  @nn.compact
  def __call__(self, x):
    b, t, _ = x.shape
    d = self.hidden // self.heads
    for i in range(self.layers):
      q, k, v = (
        nn.Dense(self.hidden, name=f"layer_{i}_{n}")(x).reshape(b, t, self.heads, d)
        for n in ("query", "key", "value")
      )
      a = jax.nn.dot_product_attention(q, k, v).reshape(b, t, self.hidden)
      x = nn.LayerNorm(name=f"layer_{i}_ln1")(
        x + nn.Dense(self.hidden, name=f"layer_{i}_attn_out")(a)
      )
      h = nn.gelu(nn.Dense(self.ffn, name=f"layer_{i}_intermediate")(x))
      x = nn.LayerNorm(name=f"layer_{i}_ln2")(
        x + nn.Dense(self.hidden, name=f"layer_{i}_output")(h)
      )
    return x


def with_numpy_adapters(base, rules, seed, layouts=None, scale=0.1):
  """``lora_init`` on shapes only (nothing to compile), then N(0, scale^2) numpy factors."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), base)
  adapted = lora_jax.lora_init(shapes, rules, rng=jax.random.key(0), layouts=layouts)
  rng = np.random.RandomState(seed)
  flat_base = dict(jax.tree_util.tree_leaves_with_path(base))

  def fill(keypath, leaf):
    if paths.keypath_str(keypath).rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
      return (scale * rng.randn(*leaf.shape)).astype(np.float32)
    return flat_base[keypath]

  return jax.tree_util.tree_map_with_path(fill, adapted)


def script_main(capsys, main, *argv) -> tuple[int, list[str]]:
  """A training script's ``main(argv)``: its exit code (argparse's ``SystemExit`` included) and
  the lines it wrote to stderr."""
  try:
    code = main(list(argv))
  except SystemExit as e:  # argparse errors
    code = e.code
  return code, capsys.readouterr().err.strip().splitlines()
