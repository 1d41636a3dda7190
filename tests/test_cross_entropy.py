"""fused_cross_entropy and the decoder's target_ids=: the loss and gradients of the full logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import lora_jax
from lora_jax.models import auto_model
from lora_jax.models import fused_cross_entropy
from lora_jax.models.decoder import llama

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(vocab_axis: int, dtype=jnp.float32, rows=(3, 7), hidden=16, vocab=53):
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], (*rows, hidden)).astype(dtype)
  w = jax.random.normal(k[1], (hidden, vocab) if vocab_axis == 1 else (vocab, hidden))
  t = jax.random.randint(k[2], rows, 0, vocab)
  g = jax.random.uniform(k[3], rows)  # per-token weights: the cotangent is not uniform
  return h, w.astype(dtype), t, g


def _dense(h, w, t, vocab_axis):
  logits = jnp.dot(h, w if vocab_axis == 1 else w.T, preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, t)


@pytest.mark.parametrize("vocab_axis", [1, 0])
@pytest.mark.parametrize("chunk", [1, 4, 21, 1000])  # 21 = all rows; 4 leaves a partial chunk
def test_loss_and_gradients_equal_the_full_logits(vocab_axis, chunk):
  h, w, t, g = _inputs(vocab_axis)

  def fused(h, w):
    return jnp.sum(g * fused_cross_entropy(h, w, t, vocab_axis=vocab_axis, chunk_size=chunk))

  def dense(h, w):
    return jnp.sum(g * _dense(h, w, t, vocab_axis))

  value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
  ref_value, ref_grads = jax.value_and_grad(dense, argnums=(0, 1))(h, w)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for got, want in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  per_token = fused_cross_entropy(h, w, t, vocab_axis=vocab_axis, chunk_size=chunk)
  assert per_token.shape == t.shape and per_token.dtype == jnp.float32
  np.testing.assert_allclose(per_token, _dense(h, w, t, vocab_axis), rtol=1e-6, atol=1e-6)


def test_bfloat16_matches_the_float32_reference_within_bf16_rounding():
  h, w, t, g = _inputs(1, jnp.bfloat16)
  got = jax.grad(lambda h: jnp.sum(g * fused_cross_entropy(h, w, t, chunk_size=5)))(h)
  w32 = w.astype(jnp.float32)
  want = jax.grad(lambda h: jnp.sum(g * _dense(h, w32, t, 1)))(h.astype(jnp.float32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=TOL[jnp.bfloat16])


def test_the_kernel_gradient_is_formed_only_when_the_kernel_is_differentiated():
  h, w, t, _ = _inputs(1)

  def kernel_sized_outputs(argnums):
    f = lambda h, w: jnp.sum(fused_cross_entropy(h, w, t, chunk_size=4))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(f, argnums=argnums))(h, w)
    found = []

    def walk(jp):
      for eqn in jp.eqns:
        found.extend(v for v in eqn.outvars if getattr(v.aval, "shape", None) == w.shape)
        for sub in jax.core.jaxprs_in_params(eqn.params):
          walk(sub)

    walk(jaxpr.jaxpr)
    return found

  assert not kernel_sized_outputs(0)  # the frozen head: no [hidden, vocab] gradient work
  assert kernel_sized_outputs((0, 1))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"vocab_axis": 2}, "vocab_axis=2; valid: \\(0, 1\\)"),
    ({"chunk_size": 0}, "chunk_size=0; valid: a positive integer"),
  ],
)
def test_bad_options_are_named(kwargs, match):
  h, w, t, _ = _inputs(1)
  with pytest.raises(ValueError, match=match):
    fused_cross_entropy(h, w, t, **kwargs)


def test_mismatched_shapes_and_float_targets_are_named():
  h, w, t, _ = _inputs(1)
  with pytest.raises(
    ValueError, match="shapes do not fit: hidden \\(3, 7, 16\\), kernel \\(53, 16\\)"
  ):
    fused_cross_entropy(h, w.T, t)
  with pytest.raises(ValueError, match="target_ids \\(3, 6\\)"):
    fused_cross_entropy(h, w, t[:, :6])
  with pytest.raises(ValueError, match="target_ids has dtype float32"):
    fused_cross_entropy(h, w, t.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------
# The decoder's target_ids=.


def _decoder(tied: bool, dtype=jnp.float32):
  cfg = transformers.LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
  )  # fmt: skip
  return auto_model(cfg, dtype=dtype, scan_layers=True)


# Two diagonal cases of the dtype x tied grid: the tied and the separate head each go through
# the fused loss once, and so do float32 and bfloat16 (the other two cases ran the same paths).
@pytest.mark.parametrize(
  ("dtype", "tied"), [(jnp.float32, True), (jnp.bfloat16, False)], ids=["float32-tied", "bfloat16"]
)
def test_decoder_target_ids_equal_the_loss_of_its_logits(tied, dtype):
  model = _decoder(tied, dtype)
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 97)
  index = jnp.array([[0, 3, 8], [2, 5, 7]])  # targets at listed positions, as run_clm.py
  targets = jnp.take_along_axis(jnp.roll(ids, -1, 1), index, axis=1)
  variables = jax.jit(model.init)(jax.random.key(0), ids)  # one program, not op by op
  targets_next = jnp.roll(ids, -1, 1)
  with_targets = jax.eval_shape(model.init, jax.random.key(0), ids, target_ids=targets_next)
  assert jax.tree.structure(with_targets) == jax.tree.structure(variables)
  rule = lora_jax.LoraRule(["q_proj", "v_proj"], 4)
  adapted = lora_jax.lora_init(variables, rule, rng=jax.random.key(2),
                               layouts=lora_jax.kernel_layouts(model, ids))  # fmt: skip
  trainable, frozen = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # B != 0: the adapters matter
  apply = lora_jax.lora_apply(model.apply)

  def from_logits(tr):
    logits = apply(lora_jax.combine(tr, frozen), ids, logits_index=index)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  def fused(tr):
    return apply(lora_jax.combine(tr, frozen), ids, logits_index=index, target_ids=targets,
                 loss_chunk_size=4)  # fmt: skip

  def losses_and_grads(losses):  # one compiled program a side: the losses and their gradients
    def mean(tr):
      each = losses(tr)
      return jnp.mean(each), each

    (_, each), grads = jax.jit(jax.value_and_grad(mean, has_aux=True))(trainable)
    return each, grads

  got_losses, got = losses_and_grads(fused)
  want_losses, want = losses_and_grads(from_logits)
  np.testing.assert_allclose(got_losses, want_losses, atol=TOL[dtype])
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, atol=TOL[dtype] * scale)


def test_decoder_target_ids_refuse_an_adapted_head_and_the_base_task():
  model = _decoder(tied=False)
  ids = jnp.ones((1, 4), jnp.int32)
  variables = model.init(jax.random.key(0), ids)
  adapted = lora_jax.lora_init(variables, lora_jax.LoraRule(["lm_head"], 2), rng=jax.random.key(1))
  apply = lora_jax.lora_apply(model.apply)
  with pytest.raises(ValueError, match="params/lm_head holds an adapter or a quantized weight"):
    apply(adapted, ids, target_ids=ids)
  base = model.clone(task="base")
  with pytest.raises(ValueError, match="target_ids= needs task='causal-lm', not 'base'"):
    base.apply({"params": variables["params"]}, ids, target_ids=ids)


@pytest.mark.parametrize("tied", [True, False])
def test_output_weight_finds_the_plain_head_and_refuses_an_adapted_one(tied):
  model = _decoder(tied)
  ids = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]
  path, weight = llama.output_weight(model.config, params)
  want = params["model"]["embed_tokens"]["embedding"] if tied else params["lm_head"]["kernel"]
  assert path == ("model/embed_tokens" if tied else "lm_head") and weight is want
  target = "embed_tokens" if tied else "lm_head"
  adapted = lora_jax.lora_init({"params": params}, lora_jax.LoraRule([target], 2),
                               rng=jax.random.key(1))  # fmt: skip
  assert llama.output_weight(model.config, adapted["params"]) == (path, None)
