"""One SGD step in each parallel mode moves the trainable weights by the same amount.

The logged-loss comparison (tests/test_glue_train.py) cannot see the scale of the gradients:
AdamW without clipping normalises it away, so summing the devices' gradients (8x) instead of
averaging them leaves the losses within 5e-7. An SGD step's update is the gradient itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from helpers import with_numpy_adapters

import lora_jax
from lora_jax import models
from train.engine import parallel
from train.engine import state as state_lib
from train.engine import step as step_lib
from train.tasks.glue import task as glue_task

EXTRA = ("classifier",)


@pytest.fixture(scope="module")
def setup():
  cfg = transformers.BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0, num_labels=3,
  )  # fmt: skip
  module, variables = models.from_config(cfg, "sequence-classification", rng=0)
  params = with_numpy_adapters(variables, lora_jax.LoraRule(["query", "value"], rank=4), seed=0)
  rng = np.random.RandomState(0)
  batch = {
    "input_ids": rng.randint(1, 64, (8, 12)).astype(np.int32),
    "attention_mask": (np.arange(12)[None] < rng.randint(4, 13, (8, 1))).astype(np.int32),
    "token_type_ids": np.zeros((8, 12), np.int32),
    "labels": rng.randint(0, 3, 8).astype(np.int32),
    "weights": np.ones(8, np.float32),
  }
  return module, params, batch


def _parallel(setup, mode: str, shard_frozen: bool = False):
  """``(Parallel, trainable, frozen, tx)`` for an SGD(1.0) step in ``mode``."""
  module, params, _ = setup
  apply_fn = lora_jax.lora_apply(module.apply)
  tx = lora_jax.lora_optimizer(optax.sgd(1.0), params, EXTRA)
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params, EXTRA))
  axis = parallel.AXIS if mode == "pmap" else None

  def loss(trainable, frozen, batch, rngs):
    logits = glue_task.forward(apply_fn, trainable, frozen, batch, deterministic=False, rngs=rngs)
    return glue_task.loss_terms(logits, batch["labels"], batch["weights"], regression=False)

  def eval_step(trainable, frozen, batch):
    return glue_task.forward(apply_fn, trainable, frozen, batch)

  par = parallel.Parallel(
    mode, step_lib.make_train_step(loss, tx, axis), eval_step, shard_frozen=shard_frozen
  )
  return par, trainable, frozen, tx


def _sgd_update(setup, mode: str, shard_frozen: bool = False):
  par, trainable, frozen, tx = _parallel(setup, mode, shard_frozen)
  batch = setup[2]
  before = jax.tree.map(np.array, trainable)  # the step donates (deletes) the state it gets
  state = par.put_state(state_lib.init_state(jax.tree.map(jnp.array, trainable), tx, seed=0))
  state, metrics = par.train(state, par.put_frozen(frozen), par.put_batch(batch))
  update = jax.tree.map(lambda a, b: np.asarray(a) - b, par.host(state.trainable), before)
  return float(metrics["loss"]), update


def test_one_sgd_step_updates_the_same_in_every_mode(setup):
  assert jax.device_count() == 8
  loss, ref = _sgd_update(setup, "none")
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(ref)) > 1e-3
  for mode, shard in (("pmap", False), ("mesh", False), ("mesh", True)):
    other_loss, update = _sgd_update(setup, mode, shard)
    assert other_loss == pytest.approx(loss, rel=1e-5), mode
    for u, r in zip(jax.tree.leaves(update), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(u, r, rtol=1e-4, atol=1e-6, err_msg=f"{mode} {shard}")


@pytest.mark.parametrize("mode", ["none", "pmap", "mesh"])
def test_the_step_compiles_once(setup, mode):
  """State from the host (as train.engine.run puts it), frozen weights already on a device (as
  ``from_pretrained`` loads them): later steps, fed the step's own outputs, reuse the first
  compilation."""
  par, trainable, frozen, tx = _parallel(setup, mode)
  frozen = par.put_frozen(jax.device_put(frozen, jax.devices()[0]))
  host = jax.tree.map(np.asarray, state_lib.init_state(trainable, tx, seed=0))
  state = par.put_state(host)
  state, _ = par.train(state, frozen, par.put_batch(setup[2]))  # compiles
  compiled = []

  def listen(event, seconds, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":  # cached or not
      compiled.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for _ in range(2):
      state, _ = par.train(state, frozen, par.put_batch(setup[2]))
    jax.block_until_ready(state)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert not compiled, f"{len(compiled)} more lowerings"


@pytest.mark.parametrize("mode, shard", [("none", False), ("pmap", False), ("mesh", True)])
def test_placed_shapes_are_what_the_put_methods_place(setup, mode, shard):
  """The shapes the lowering suite and the memory benchmark plan from (``placed_shapes``) carry
  the shapes, dtypes and shardings the run itself places (a pmap batch stays numpy: pmap puts
  it on its devices' leading axis)."""
  par, trainable, frozen, tx = _parallel(setup, mode, shard)
  state = state_lib.init_state(jax.tree.map(jnp.array, trainable), tx, seed=0)
  frozen = {**frozen, "big": np.zeros((256, 512), np.float32)}  # large enough for FSDP to split
  planned = par.placed_shapes(state, frozen, setup[2])
  placed = par.put_state(state), par.put_frozen(frozen), par.put_batch(setup[2])
  for plan, put in zip(planned, placed, strict=True):
    for p, x in zip(jax.tree.leaves(plan), jax.tree.leaves(put), strict=True):
      assert (p.shape, p.dtype) == (x.shape, x.dtype)
      if isinstance(x, jax.Array):
        assert p.sharding.is_equivalent_to(x.sharding, x.ndim), (mode, p.sharding, x.sharding)
  frozen_shardings = {p.sharding for p in jax.tree.leaves(planned[1])}
  assert len(frozen_shardings) == (2 if shard else 1)  # FSDP: the large leaf split
