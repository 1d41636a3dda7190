"""LoRA for Flax NNX models (``lora_jax.nnx``): the low-rank path against the dense merge, training
with ``nnx.Optimizer(wrt=nnx.LoRAParam)``, reports, files, and flax's own ``nnx.LoRA``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax
from lora_jax import LoraRule
from tests.nnx_models import DIM
from tests.nnx_models import HEADS
from tests.nnx_models import VOCAB
from tests.nnx_models import Zoo
from tests.nnx_models import ids as make_ids

# Every linear module of Zoo and its embedding: (path, inputs, outputs) as PEFT counts them.
TARGETS = {
  "embed": (VOCAB, DIM),
  "conv": (3 * DIM, DIM),
  "attn/query": (DIM, DIM),
  "attn/key": (DIM, DIM),
  "attn/value": (DIM, DIM),
  "attn/out": (DIM, DIM),
  "mix": (DIM, DIM),
  "up": (DIM, 2 * DIM),
  "down": (2 * DIM, DIM),
}


@nnx.jit
def call(model, x):
  """``model(x)``, compiled (eager NNX runs op by op, slowly)."""
  return model(x)


def _randomize(model, scale=0.3, seed=5):
  """Non-zero ``B`` (and ``A``) everywhere, as if trained."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


def _adapted(rank=3, alpha=6.0, **kw):
  model = Zoo(rngs=nnx.Rngs(0))
  return lora_jax.nnx.lora_init(
    model, LoraRule(list(TARGETS), rank=rank, alpha=alpha, **kw), rngs=nnx.Rngs(1)
  )


def test_fresh_adapters_change_no_output_bit_and_keep_the_base_variables():
  model = Zoo(rngs=nnx.Rngs(0))
  x = make_ids()
  before = call(model, x)
  kernel = model.attn.query.kernel
  adapted = lora_jax.nnx.lora_init(model, LoraRule(list(TARGETS), rank=3), rngs=nnx.Rngs(1))
  assert adapted is model and model.attn.query.kernel is kernel  # in place, same variables
  assert isinstance(model.attn.query, nnx.LinearGeneral)
  assert isinstance(model.attn.query.lora_a, nnx.LoRAParam)
  np.testing.assert_array_equal(call(model, x), before)


def test_low_rank_path_equals_the_merged_model():
  model = _randomize(_adapted(), scale=0.1)
  x = make_ids()
  merged = lora_jax.nnx.merge(model)
  assert not lora_jax.nnx.tree.adapted(merged)
  assert type(merged.attn.query) is nnx.LinearGeneral and type(merged.up) is nnx.Linear
  got, want = call(model, x), call(merged, x)
  assert float(jnp.abs(got - call(lora_jax.nnx.unload(model), x)).max()) > 1e-2  # adapters matter
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert hasattr(model.up, "lora_a")  # merge left its input as it was


def test_nnx_optimizer_trains_only_the_adapters():
  model = _adapted()
  x = make_ids(batch=4, seed=1)
  y = (x + 1) % VOCAB
  base = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x, y)) for _ in range(30)]
  assert losses[-1] < 0.8 * losses[0], losses
  after = nnx.state(model, nnx.Not(nnx.LoRAParam))
  chex.assert_trees_all_equal(jax.tree.map(np.array, after), base)


def test_param_report_counts_what_peft_would():
  rank = 4
  model = _adapted(rank=rank)
  want = sum(rank * (n_in + n_out) for n_in, n_out in TARGETS.values())
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  line = lora_jax.param_report(model).splitlines()[0]
  assert line == lora_jax._src.report.summary_line(want, total), line
  assert f"trainable params: {want:,} |" in line


def test_functional_route_split_grad_merge():
  model = _randomize(_adapted())
  x = make_ids()
  graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

  @jax.jit
  def loss(lora_state, rest, x):
    return jnp.mean(nnx.merge(graphdef, lora_state, rest)(x) ** 2)

  grads = jax.grad(loss)(lora_state, rest, x)
  assert set(jax.tree.leaves(jax.tree.map(lambda g: g.shape, grads))) and all(
    float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads)
  )
  grad = nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))
  chex.assert_trees_all_close(grads, nnx.jit(grad)(model), rtol=1e-4, atol=1e-5)


def test_gradient_costs_no_weight_sized_work():
  """An NNX transformer block with every linear adapted: the gradient w.r.t. nnx.LoRAParam
  costs at most 2.2x the forward FLOPs (a full weight gradient would cost about 3x)."""

  class Block(nnx.Module):
    def __init__(self, dim, rngs):
      self.attn = nnx.MultiHeadAttention(4, dim, decode=False, deterministic=True, rngs=rngs)
      self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
      self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
      x = x + self.attn(x)
      return x + self.down(jax.nn.gelu(self.up(x)))

  dim = 256
  model = lora_jax.nnx.lora_init(
    Block(dim, nnx.Rngs(0)), LoraRule("all-linear", rank=8), rngs=nnx.Rngs(1)
  )
  graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
  x = jnp.ones((4, 64, dim))

  def forward(lora_state, rest, x):
    return jnp.sum(nnx.merge(graphdef, lora_state, rest)(x))

  def flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

  ratio = flops(jax.grad(forward), lora_state, rest, x) / flops(forward, lora_state, rest, x)
  assert ratio <= 2.2, ratio


def test_same_outputs_as_flax_nnx_lora():
  linear = nnx.Linear(12, 7, rngs=nnx.Rngs(0))
  ours = lora_jax.nnx.lora_init(
    nnx.clone(linear), LoraRule(".*", rank=3, alpha=9.0), rngs=nnx.Rngs(1)
  )
  _randomize(ours)
  theirs = nnx.LoRA(12, 3, 7, base_module=linear, rngs=nnx.Rngs(2))
  theirs.lora_a[...] = ours.lora_a[...]
  theirs.lora_b[...] = ours.lora_b[...] * ours.lora_spec.scale  # nnx.LoRA has no alpha
  x = jax.random.normal(jax.random.key(3), (5, 12))
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-6, rtol=0)


def test_dropout_is_rescaled_and_off_in_eval_mode():
  rate = 0.5
  model = lora_jax.nnx.lora_init(
    nnx.Linear(8, 3, rngs=nnx.Rngs(0)),
    LoraRule(".*", rank=2, dropout=rate),
    rngs=nnx.Rngs(1, lora_dropout=2),
  )
  _randomize(model, scale=1.0)
  x = jnp.tile(jnp.linspace(-1.0, 1.0, 8), (20000, 1))  # one input, many independent masks
  plain = lora_jax.nnx.unload(model)(x[:1])
  no_dropout = lora_jax.nnx.merge(model)(x[:1])
  y = model(x)
  assert float(jnp.abs(y[0] - y[1]).max()) > 1e-3  # rows drew different masks
  # the adapter's mean contribution is its no-dropout value (inverted dropout rescales by 2)
  np.testing.assert_allclose(y.mean(0) - plain[0], (no_dropout - plain)[0], atol=0.05)
  model.eval()
  np.testing.assert_allclose(model(x[:2]), jnp.tile(no_dropout, (2, 1)), atol=1e-5)
  model.train()
  assert float(jnp.abs(model(x[:2])[0] - no_dropout[0]).max()) > 1e-3


class Pair(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(10, 6, rngs=rngs)
    self.b = nnx.LinearGeneral(6, (2, 3), rngs=rngs)

  def __call__(self, x):
    return self.b(self.a(x)).reshape(x.shape[0], -1)


class JitAndEagerTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_fresh_adapters_are_exact_and_trained_ones_equal_the_merge(self):
    model = Pair(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 10))
    before = model(x)
    lora_jax.nnx.lora_init(model, LoraRule(".*", rank=2, alpha=3.0), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    forward = self.variant(lambda state, x: nnx.merge(graphdef, state)(x))
    np.testing.assert_array_equal(forward(state, x), before)
    _randomize(model)
    got = forward(nnx.state(model), x)
    np.testing.assert_allclose(got, lora_jax.nnx.merge(model)(x), atol=1e-5)


def test_variants_rslora_dora_pissa_agree_with_the_merge():
  x = jax.random.normal(jax.random.key(0), (3, 10))

  for kw in (dict(rslora=True), dict(use_dora=True), dict(init="pissa"), dict(init="olora")):
    model = Pair(nnx.Rngs(0))
    before = model(x)
    lora_jax.nnx.lora_init(model, LoraRule(".*", rank=2, alpha=4.0, **kw), rngs=nnx.Rngs(1))
    np.testing.assert_allclose(model(x), before, atol=1e-5, err_msg=str(kw))
    _randomize(model, scale=0.2)
    if kw.get("use_dora"):
      model.a.lora_magnitude[...] = model.a.lora_magnitude[...] * 1.5
    np.testing.assert_allclose(model(x), lora_jax.nnx.merge(model)(x), atol=1e-5, err_msg=str(kw))


def test_bf16_base_runs_in_bf16_and_matches_the_merge():
  model = Zoo(rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  lora_jax.nnx.lora_init(model, LoraRule(["up", "down", "attn/query"], rank=4), rngs=nnx.Rngs(1))
  assert model.up.kernel.dtype == jnp.bfloat16 and model.up.lora_a.dtype == jnp.float32
  _randomize(model, scale=0.1)
  x = make_ids()
  got = call(model, x)
  assert got.dtype == jnp.bfloat16
  want = call(lora_jax.nnx.merge(model), x)
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=0.1, rtol=0.05)


def test_stacked_layers_from_nnx_vmap_run_under_nnx_scan():
  layers = 3

  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.proj = nnx.Linear(DIM, DIM, rngs=rngs)

    def __call__(self, x):
      return x + jnp.tanh(self.proj(x))

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return Layer(nnx.Rngs(key))

  @nnx.jit
  def run(stack, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, x):
      return layer(x)

    return body(stack, x)

  stack = make(jax.random.split(jax.random.key(0), layers))
  rule = LoraRule(["proj"], rank=2, dropout=0.5)
  lora_jax.nnx.lora_init(stack, rule, rngs=nnx.Rngs(1, lora_dropout=2))
  assert stack.proj.lora_a.shape == (layers, DIM, 2) and stack.proj.lora_spec.stacked == 1
  _randomize(stack)
  x = jax.random.normal(jax.random.key(2), (2, DIM))
  train_1, train_2 = run(stack, x), run(stack, x)  # dropout per layer, new masks each call
  assert float(jnp.abs(train_1 - train_2).max()) > 1e-3
  stack.eval()
  np.testing.assert_allclose(run(stack, x), run(lora_jax.nnx.merge(stack), x), atol=1e-5)
  one = lora_jax.nnx.merge(stack).proj.kernel[...][1]
  a, b = stack.proj.lora_a[...][1], stack.proj.lora_b[...][1]
  np.testing.assert_allclose(one, stack.proj.kernel[...][1] + a @ b, atol=1e-6)


def test_quantized_base_is_dequantized_in_the_call():
  model = Zoo(rngs=nnx.Rngs(0))
  lora_jax.quantize(model, ["up", "down"], block_size=32)
  assert isinstance(model.up.kernel.get_value(), lora_jax.QuantizedArray)
  x = make_ids()
  plain = call(model, x)  # runs on the dequantized weights
  lora_jax.nnx.lora_init(model, LoraRule(["up", "down"], rank=2), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(call(model, x), plain)
  _randomize(model)
  merged = lora_jax.nnx.merge(model)
  assert not isinstance(merged.up.kernel.get_value(), lora_jax.QuantizedArray)
  np.testing.assert_allclose(
    call(model, x), call(merged, x), atol=1e-5 * float(jnp.abs(plain).max())
  )


def test_unmerge_and_unload_restore_the_base():
  model = _randomize(_adapted())
  base = lora_jax.nnx.unload(model)
  restored = lora_jax.nnx.unmerge(lora_jax.nnx.merge(model), model)
  chex.assert_trees_all_close(nnx.state(restored, nnx.Param), nnx.state(base, nnx.Param), atol=1e-5)
  with pytest.raises(ValueError, match="beyond rounding"):
    lora_jax.nnx.unmerge(base, model)  # nothing was merged into base


def test_bad_rules_fail_in_one_line_naming_the_module():
  class Custom(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.ones((4, 4)))

  class Holder(nnx.Module):
    def __init__(self):
      self.custom = Custom()
      self.conv = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(0))

  with pytest.raises(ValueError, match=r"'custom'.*Custom is not supported"):
    lora_jax.nnx.lora_init(Holder(), LoraRule(["custom"], rank=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'conv'.*feature_group_count=2"):
    lora_jax.nnx.lora_init(Holder(), LoraRule(["conv"], rank=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="matches no module; closest module paths"):
    lora_jax.nnx.lora_init(Zoo(rngs=nnx.Rngs(0)), LoraRule(["qery"], rank=2), rngs=nnx.Rngs(0))


def test_all_linear_reaches_multi_axis_kernels_from_their_own_attributes():
  model = lora_jax.nnx.lora_init(
    Zoo(rngs=nnx.Rngs(0)), LoraRule("all-linear", rank=2), rngs=nnx.Rngs(1)
  )
  got = sorted(lora_jax.nnx.tree.adapted(model))
  assert got == ["attn/key", "attn/out", "attn/query", "attn/value", "down", "mix", "up"]
  assert model.attn.out.lora_a.shape == (HEADS, DIM // HEADS, 2)


def test_adapter_round_trip_through_orbax_in_a_fresh_process(tmp_path):
  model = _randomize(_adapted())
  x = make_ids()
  folder = lora_jax.save_adapter(tmp_path / "adapter", model)
  np.save(tmp_path / "want.npy", np.asarray(call(model, x)))
  script = f"""
    import numpy as np
    from flax import nnx
    import lora_jax
    from tests.nnx_models import Zoo, ids
    model = lora_jax.load_adapter({str(folder)!r}, Zoo(rngs=nnx.Rngs(0)))
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids()))
    np.testing.assert_array_equal(got, np.load({str(tmp_path / "want.npy")!r}))
    print("ok", type(model.up.lora_a).__name__)
  """
  out = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=False
  )
  assert out.returncode == 0 and out.stdout.strip() == "ok LoRAParam", out.stderr[-2000:]


class TinyLlamaNames(nnx.Module):
  """A small NNX network named as a Hugging Face Llama (``model.layers.0.self_attn.q_proj``,
  ``mlp.gate_proj``, ``lm_head``, ...): enough for PEFT to find every adapted module in its
  PyTorch twin below."""

  def __init__(self, vocab=32, dim=16, hidden=24, layers=2, *, rngs):
    self.model = nnx.Module()
    self.model.embed_tokens = nnx.Embed(vocab, dim, rngs=rngs)
    self.model.layers = nnx.List([nnx.Module() for _ in range(layers)])
    for layer in self.model.layers:
      layer.self_attn = nnx.Module()
      for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(layer.self_attn, name, nnx.Linear(dim, dim, use_bias=False, rngs=rngs))
      layer.mlp = nnx.Module()
      layer.mlp.gate_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
      layer.mlp.up_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
      layer.mlp.down_proj = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)
    self.lm_head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    h = self.model.embed_tokens(ids)
    for layer in self.model.layers:
      a = layer.self_attn
      h = h + a.o_proj(a.v_proj(h) * jax.nn.sigmoid(a.q_proj(h)) + a.k_proj(h))
      m = layer.mlp
      h = h + m.down_proj(jax.nn.silu(m.gate_proj(h)) * m.up_proj(h))
    return self.lm_head(h)


def _torch_twin(model: TinyLlamaNames):
  """The same network in PyTorch, with the NNX model's weights."""
  import torch

  class Twin(torch.nn.Module):
    def __init__(self):
      super().__init__()
      vocab, dim = model.model.embed_tokens.embedding.shape
      hidden = model.model.layers[0].mlp.up_proj.kernel.shape[1]
      self.model = torch.nn.Module()
      self.model.embed_tokens = torch.nn.Embedding(vocab, dim)
      self.model.layers = torch.nn.ModuleList()
      for _ in model.model.layers:
        layer = torch.nn.Module()
        layer.self_attn = torch.nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
          setattr(layer.self_attn, name, torch.nn.Linear(dim, dim, bias=False))
        layer.mlp = torch.nn.Module()
        layer.mlp.gate_proj = torch.nn.Linear(dim, hidden, bias=False)
        layer.mlp.up_proj = torch.nn.Linear(dim, hidden, bias=False)
        layer.mlp.down_proj = torch.nn.Linear(hidden, dim, bias=False)
        self.model.layers.append(layer)
      self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
      h = self.model.embed_tokens(ids)
      for layer in self.model.layers:
        a = layer.self_attn
        h = h + a.o_proj(a.v_proj(h) * torch.sigmoid(a.q_proj(h)) + a.k_proj(h))
        m = layer.mlp
        h = h + m.down_proj(torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))
      return self.lm_head(h)

  twin = Twin()
  state = {}
  for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(str(k) for k in path[:-1])
    leaf = path[-1]
    array = np.asarray(value.get_value())
    state[f"{name}.weight"] = torch.tensor(array.T if leaf == "kernel" else array)
  twin.load_state_dict(state)
  return twin.eval()


def test_peft_export_of_an_nnx_model_loads_in_peft_and_round_trips(tmp_path):
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  model = TinyLlamaNames(rngs=nnx.Rngs(0))
  twin = _torch_twin(model)
  targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
  lora_jax.nnx.lora_init(model, LoraRule(targets, rank=4, alpha=8.0), rngs=nnx.Rngs(1))
  _randomize(model, scale=0.2)
  folder = lora_jax.export_peft(
    tmp_path / "adapter", model, base_model_name_or_path="tiny", task_type=None
  )
  ids = np.array([[1, 5, 9, 3, 30, 2]])
  want = np.asarray(call(model, jnp.asarray(ids)))
  peft_model = peft.PeftModel.from_pretrained(twin, folder).eval()
  with torch.no_grad():
    got = peft_model(torch.tensor(ids)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # and back: the PEFT folder into a fresh NNX model gives the same logits
  again = lora_jax.import_peft(folder, TinyLlamaNames(rngs=nnx.Rngs(0)))
  assert sorted(lora_jax.nnx.tree.adapted(again)) == sorted(lora_jax.nnx.tree.adapted(model))
  np.testing.assert_allclose(np.asarray(call(again, jnp.asarray(ids))), want, atol=1e-5)


def test_linen_functions_point_an_nnx_user_to_lora_jax_nnx():
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  rule = LoraRule(".*", rank=2)
  with pytest.raises(TypeError, match=r"not an NNX model: use lora_jax.nnx.lora_init"):
    lora_jax.lora_init(model, rule, rng=jax.random.key(0))
  with pytest.raises(TypeError, match=r"not an nnx.State: use lora_jax.nnx.lora_init"):
    lora_jax.lora_init(nnx.split(model)[1], rule, rng=jax.random.key(0))
  with pytest.raises(TypeError, match=r"lora_apply takes a linen parameter tree, not an nnx"):
    lora_jax.lora_apply(lambda v, x: x)(nnx.state(model), 1.0)
  assert lora_jax.kernel_layouts(model, jnp.ones((1, 4))) == lora_jax.nnx.layouts(model)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_the_nnx_training_step_lowers_for_gpu_and_tpu(platform):
  model = Zoo(rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  lora_jax.nnx.lora_init(model, LoraRule(list(TARGETS), rank=4, dropout=0.1), rngs=nnx.Rngs(1))
  graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

  def step(lora_state, rest, x):  # with LoRA dropout: nnx.grad carries the rng counts
    model = nnx.merge(graphdef, lora_state, rest)
    loss = lambda m: jnp.mean(m(x).astype(jnp.float32) ** 2)  # noqa: E731
    return nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)

  exported = jax.export.export(jax.jit(step), platforms=(platform,))(lora_state, rest, make_ids())
  assert exported.platforms == (platform,)
