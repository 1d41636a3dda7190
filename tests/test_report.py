"""param_report against counts published in LoRA write-ups."""

import flax.linen as nn
import jax
import jax.numpy as jnp

import lora_jax
from lora_jax import LoraRule


class WriteupMLP(nn.Module):
  """3072 -> 128 -> 128 -> 10 with ReLU (a LoRA tutorial's CIFAR MLP)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128, name="fc1")(x))
    x = nn.relu(nn.Dense(128, name="fc2")(x))
    return nn.Dense(10, name="fc3")(x)


def test_mlp_writeup_counts():
  shapes = jax.eval_shape(WriteupMLP().init, jax.random.key(0), jnp.ones((1, 3072)))
  adapted = lora_jax.lora_init(shapes, LoraRule(".*", rank=32), rng=jax.random.key(0))
  report = lora_jax.param_report(adapted)
  lines = report.splitlines()
  assert lines[0] == "trainable params: 115,008 || all params: 526,154 || trainable%: 21.8582"
  rows = {line.split()[0]: line.split() for line in lines[2:]}
  # torchinfo's table: 102,400 + 8,192 + 4,416 adapter parameters over a 411,146 base
  assert rows["params/fc1"][2] == "102,400"
  assert rows["params/fc2"][2] == "8,192"
  assert rows["params/fc3"][2] == "4,416"
  base = sum(x.size for x in jax.tree.leaves(shapes))
  assert base == 411_146


def test_extra_trainable_counts():
  v = nn.Dense(10).init(jax.random.key(0), jnp.ones((1, 100)))
  v = lora_jax.lora_init(v, LoraRule(".*", rank=4), rng=jax.random.key(1))
  assert lora_jax.param_report(v, extra_trainable=["bias"]).splitlines()[0] == (
    "trainable params: 450 || all params: 1,450 || trainable%: 31.0345"
  )
