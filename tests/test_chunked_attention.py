"""The "xla_chunked" attention: XLA's attention a block of queries at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from lora_jax.models import auto_model
from lora_jax.models.layers.attention import QUERY_CHUNK
from lora_jax.models.layers.attention import attention
from lora_jax.models.layers.attention import chunked_attention
from lora_jax.models.layers.attention import same_segment


def _qkv(seq: int, batch=2, heads=4, kv_heads=2, dim=8):
  k = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(k[0], (batch, seq, heads, dim))
  kk = jax.random.normal(k[1], (batch, seq, kv_heads, dim))
  v = jax.random.normal(k[2], (batch, seq, kv_heads, dim))
  return q, kk, v, jax.random.normal(k[3], q.shape)


def _masks(seq: int):
  causal = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
  cut = seq // 3
  segments = jnp.array([[1] * cut + [2] * (seq - cut), [1] * (seq - 5) + [0] * 5])
  return {"none": None, "causal": causal, "packed": causal & same_segment(segments)}


@pytest.mark.parametrize("mask_kind", ["none", "causal", "packed"])
@pytest.mark.parametrize("chunk", [8, 13, 64])  # 13: the last block is partly filler; 64 >= seq
def test_chunked_equals_xla_attention_with_gradients(mask_kind, chunk):
  q, k, v, w = _qkv(37)
  mask = _masks(37)[mask_kind]

  def loss(fn):
    return lambda q, k, v: jnp.sum(w * fn(q, k, v))

  full = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)  # noqa: E731
  blocks = lambda q, k, v: chunked_attention(q, k, v, mask, chunk=chunk)  # noqa: E731
  # jitted: one program each, not op by op
  np.testing.assert_allclose(jax.jit(blocks)(q, k, v), jax.jit(full)(q, k, v), atol=2e-6)
  want = jax.jit(jax.grad(loss(full), argnums=(0, 1, 2)))(q, k, v)
  got = jax.jit(jax.grad(loss(blocks), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(got, want, strict=True):
    np.testing.assert_allclose(g, r, atol=1e-5)


def test_chunked_attention_plans_less_memory_than_xla():
  """Only a block's [batch, heads, chunk, keys] scores exist at once, forward and backward."""
  q, k, v, w = _qkv(1024, batch=1, heads=8, kv_heads=8, dim=16)
  mask = _masks(1024)["causal"]

  def temp(fn):
    loss = lambda q, k, v, w, mask: jnp.sum(w * fn(q, k, v, mask))  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, k, v, w, mask).compile().memory_analysis().temp_size_in_bytes

  scores = 8 * 1024 * 1024 * 4  # one float32 [heads, seq, keys] array
  assert temp(lambda *a: attention(*a, implementation="xla")) > 2.5 * scores  # three of them
  assert temp(lambda *a: chunked_attention(*a, chunk=128)) < 0.75 * scores  # blocks of 1/8


def test_decoder_with_chunked_attention_gives_the_same_logits():
  cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2)  # fmt: skip
  seq = QUERY_CHUNK + 9  # two blocks, the second mostly filler
  ids = jax.random.randint(jax.random.key(1), (1, seq), 0, 64)
  segments = jnp.array([[1] * 300 + [2] * (seq - 300)])
  plain = auto_model(cfg, attention_implementation="xla")
  variables = jax.jit(plain.init)(jax.random.key(0), ids[:, :4])  # one program, not op by op
  want = jax.jit(plain.apply)(variables, ids, segment_ids=segments)
  chunked = auto_model(cfg, attention_implementation="xla_chunked")
  got = jax.jit(chunked.apply)(variables, ids, segment_ids=segments)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_unknown_implementation_lists_the_valid_ones():
  q, k, v, _ = _qkv(4)
  valid = "\\(None, 'xla', 'xla_chunked', 'cudnn', 'pallas', 'pallas_interpret'\\)"
  with pytest.raises(ValueError, match=f"'flash'; valid: {valid}"):
    attention(q, k, v, None, implementation="flash")
