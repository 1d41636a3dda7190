"""DoRA (issue 12, item 2): magnitude init, low-rank forward and gradients against a dense
reference, merge / unmerge, adapter files, and PEFT both ways (BERT and Llama families)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import transformers
from helpers import MLP
from helpers import TINY_BERT
from helpers import Heads

import lora_jax
from lora_jax import LoraRule
from lora_jax import lora_apply
from lora_jax import lora_init
from lora_jax import merge
from lora_jax import unmerge
from lora_jax._src import paths
from lora_jax._src.spec import delta


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(8, name="proj")(x)), None


class Scanned(nn.Module):
  """Three layers under ``nn.scan``: kernels ``[3, 8, 8]``, adapters stacked."""

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
      name="layers"
    )
    return layers(x, None)[0]


class EinsumNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Einsum((8, 4), "bi,io->bo", name="mix")(x)


def _modules(tree):
  return [(p, m) for p, m in paths.iter_modules(paths.split_params(tree)[0]) if "lora_spec" in m]


def trained(params, seed: int, scale: float = 0.3, magnitude_noise: float = 0.2):
  """Adapters "as if trained": every A and B random, each magnitude off its start by ~20%."""
  rng = np.random.RandomState(seed)

  def fill(keypath, leaf):
    name = paths.keypath_str(keypath).rsplit("/", 1)[-1]
    if name in ("lora_a", "lora_b"):
      return jnp.asarray(scale * rng.randn(*leaf.shape), jnp.float32)
    if name == "lora_magnitude":
      return leaf * jnp.asarray(1.0 + magnitude_noise * rng.randn(*leaf.shape), jnp.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, params)


def dense_reference(params, detach: bool = True):
  """The plain tree whose weights are DoRA's ``m * (W + sBA) / stop_gradient(||W + sBA||)``,
  written out with the norm over the input axes (keepdims), independently of dora.py."""
  tree, rebuild = paths.split_params(params)

  def fold(path, module):
    spec = module.get("lora_spec")
    if spec is None:
      return module
    w = module[spec.weight].astype(jnp.float32)
    v = w + delta(spec, module["lora_a"], module["lora_b"])
    in_axes = tuple(spec.stacked + i for i in spec.in_axes)
    norm = jnp.sqrt(jnp.sum(v * v, axis=in_axes, keepdims=True))
    if detach:
      norm = jax.lax.stop_gradient(norm)
    m = jnp.reshape(module["lora_magnitude"], norm.shape)  # out axes ascending in these models
    plain = {k: x for k, x in module.items() if not k.startswith("lora_")}
    return {**plain, spec.weight: (m * v / norm).astype(module[spec.weight].dtype)}

  return rebuild(paths.map_modules(fold, tree))


HEADS_RULE = LoraRule(["query", "out"], rank=3, alpha=6, use_dora=True)


def _cases():
  """(name, model, input, rule, layouts) for Dense, DenseGeneral (into and out of heads) and
  scanned layers."""
  x2 = jax.random.normal(jax.random.key(7), (6, 8))
  x3 = jax.random.normal(jax.random.key(8), (2, 5, 8))
  heads = Heads()
  scanned = lora_jax.kernel_layouts(Scanned(), x2)
  return [
    ("dense", MLP(), x2, LoraRule(".*", rank=2, alpha=4, use_dora=True), None),
    ("dense_general", heads, x3, HEADS_RULE, lora_jax.kernel_layouts(heads, x3)),
    ("scanned", Scanned(), x2, LoraRule(".*", rank=2, use_dora=True), scanned),
  ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def with_biases(variables, seed: int = 0):
  """``variables`` with every bias N(0, 0.5^2) (Flax initialises them to zero, which would hide
  a mishandled bias)."""
  rng = np.random.RandomState(seed)

  def fill(keypath, leaf):
    if paths.keypath_str(keypath).endswith("bias"):
      return jnp.asarray(0.5 * rng.randn(*leaf.shape), leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, variables)


def _adapted(case, seed=1):
  _, model, x, rule, layouts = case
  base = with_biases(model.init(jax.random.key(0), x))
  return base, lora_init(base, rule, rng=jax.random.key(seed), layouts=layouts)


# ---------------------------------------------------------------------------------------------
# Init, forward, gradients, merge.


def test_magnitude_starts_at_the_row_norms_of_w_and_changes_no_output():
  for case in CASES:
    name, model, x, _, _ = case
    base, params = _adapted(case)
    for path, module in _modules(params):
      w = np.asarray(module["kernel"], np.float64)
      spec = module["lora_spec"]
      if spec.stacked:  # [L, in, out]: each layer's rows as transformers stores them [out, in]
        want = np.stack([np.linalg.norm(layer.T, axis=1) for layer in w])
      elif w.ndim == 2:
        want = np.linalg.norm(w.T, axis=1)
      else:  # DenseGeneral: every axis but the outputs is an input axis
        want = np.sqrt((w**2).sum(axis=spec.in_axes))
      m = module["lora_magnitude"]
      assert m.dtype == jnp.float32 and m.shape == want.shape, (name, path)
      np.testing.assert_allclose(np.asarray(m), want, rtol=1e-6, err_msg=f"{name} {path}")
    got = jax.jit(lora_apply(model.apply))(params, x)
    np.testing.assert_allclose(got, jax.jit(model.apply)(base, x), atol=1e-6, err_msg=name)
  # shapes only: nothing is computed, the magnitude is a ShapeDtypeStruct too
  case = CASES[2]
  shapes = jax.eval_shape(case[1].init, jax.random.key(0), case[2])
  abstract = lora_init(shapes, case[3], rng=jax.random.key(1), layouts=case[4])
  m = abstract["params"]["layers"]["proj"]["lora_magnitude"]
  assert m == jax.ShapeDtypeStruct((3, 8), jnp.float32)


def test_with_a_pissa_start_the_magnitude_is_that_of_the_original_weight():
  """PiSSA replaces W by the residual W - sBA: m = ||W_res + sBA|| = ||W||, outputs unchanged."""
  model, x = MLP(), jax.random.normal(jax.random.key(3), (5, 8))
  base = model.init(jax.random.key(0), x)
  rule = LoraRule(".*", rank=2, alpha=4, init="pissa", use_dora=True)
  params = lora_init(base, rule, rng=jax.random.key(1))
  w = np.asarray(base["params"]["dense_1"]["kernel"])
  m = params["params"]["dense_1"]["lora_magnitude"]
  np.testing.assert_allclose(m, np.linalg.norm(w.T, axis=1), rtol=1e-5)
  y = jax.jit(lora_apply(model.apply))(params, x)
  np.testing.assert_allclose(y, model.apply(base, x), atol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=["dense", "scanned"])
def test_on_a_quantized_base_dora_uses_the_dequantized_weight(case):
  """QLoRA + DoRA: the magnitude starts at the dequantized weight's norms, the low-rank path
  equals merge (which dequantizes), and unmerge gives the dequantized base back."""
  _, model, x, rule, layouts = case
  base = with_biases(model.init(jax.random.key(0), x))
  quantized = lora_jax.quantize(base, ".*", kind="nf4", block_size=32, layouts=layouts)
  plain = merge(quantized)  # the dequantized base
  params = lora_init(quantized, rule, rng=jax.random.key(1), layouts=layouts)
  np.testing.assert_allclose(
    jax.jit(lora_apply(model.apply))(params, x), model.apply(plain, x), atol=1e-5
  )
  dense = lora_init(plain, rule, rng=jax.random.key(1), layouts=layouts)
  for (path, q), (_, d) in zip(_modules(params), _modules(dense), strict=True):
    np.testing.assert_allclose(q["lora_magnitude"], d["lora_magnitude"], rtol=1e-6, err_msg=path)
  params = trained(params, 4)
  low_rank = jax.jit(lora_apply(model.apply))(params, x)
  np.testing.assert_allclose(model.apply(merge(params), x), low_rank, atol=2e-5, rtol=1e-5)
  restored = unmerge(merge(params), params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_low_rank_forward_equals_merge_and_the_dense_reference(case):
  _, model, x, _, _ = case
  base, params = _adapted(case)
  params = trained(params, 2)
  low_rank = jax.jit(lora_apply(model.apply))(params, x)
  assert np.abs(np.asarray(low_rank - model.apply(base, x))).max() > 0.1  # DoRA does something
  np.testing.assert_allclose(model.apply(merge(params), x), low_rank, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(model.apply(dense_reference(params), x), low_rank, atol=2e-5)
  merged_path = jax.jit(lora_apply(model.apply, strategy="merge"))(params, x)
  np.testing.assert_allclose(merged_path, low_rank, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_of_m_a_b_equal_the_dense_reference_with_the_norm_detached(case):
  _, model, x, _, _ = case
  _, params = _adapted(case)
  params = trained(params, 3)
  mask = lora_jax.trainable_mask(params)
  trainable, frozen = lora_jax.partition(params, mask)
  out_shape = jax.eval_shape(model.apply, params, x).shape
  g = jax.random.normal(jax.random.key(9), out_shape)

  def low_rank_loss(t):
    return jnp.sum(lora_apply(model.apply)(lora_jax.combine(t, frozen), x) * g)

  def reference_loss(t, detach=True):
    return jnp.sum(model.apply(dense_reference(lora_jax.combine(t, frozen), detach), x) * g)

  ours = jax.jit(jax.grad(low_rank_loss))(trainable)
  want = jax.jit(jax.grad(reference_loss))(trainable)
  attached = jax.jit(jax.grad(lambda t: reference_loss(t, detach=False)))(trainable)
  leaves = {paths.keypath_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(ours)}
  assert {p.rsplit("/", 1)[-1] for p in leaves} == {"lora_a", "lora_b", "lora_magnitude"}
  for (kp, got), w, a in zip(
    jax.tree_util.tree_leaves_with_path(ours),
    jax.tree.leaves(want),
    jax.tree.leaves(attached),
    strict=True,
  ):
    name = paths.keypath_str(kp)
    scale = float(np.abs(np.asarray(w)).max())
    np.testing.assert_allclose(got, w, atol=1e-5 * scale, rtol=1e-5, err_msg=name)
    if not name.endswith("lora_magnitude"):  # the detached norm matters for A and B
      assert np.abs(np.asarray(a - w)).max() > 1e-3 * scale, name


def test_dropout_recomputes_the_base_on_the_dropped_input_as_peft():
  """With dropout, ``y - (W x + bias) = x_d @ ((m/n - 1) W + (m/n) s A B)`` (PEFT); a one-hot
  input row makes ``x_d`` either 0 or ``e_i / (1 - p)``, so each output row is one of the two."""
  model, p = nn.Dense(5), 0.5
  x = jnp.tile(jnp.eye(4), (16, 1))  # 64 one-hot rows
  base = with_biases(model.init(jax.random.key(0), x))
  params = trained(
    lora_init(base, LoraRule(".*", rank=2, dropout=p, use_dora=True), rng=jax.random.key(1)), 4
  )
  y = lora_apply(model.apply)(params, x, rngs={"lora_dropout": jax.random.key(5)})
  no_drop = lora_apply(model.apply)(params, x)  # no rng: dropout off
  np.testing.assert_allclose(no_drop, model.apply(merge(params), x), atol=1e-5)
  q = params["params"]
  w = np.asarray(q["kernel"])
  v = w + np.asarray(delta(q["lora_spec"], q["lora_a"], q["lora_b"]))
  r = np.asarray(q["lora_magnitude"]) / np.linalg.norm(v, axis=0)
  kept = ((r - 1) * w + r * (v - w)) / (1 - p)  # row i: the adapter's change for x_d = e_i/(1-p)
  change = np.asarray(y - model.apply(base, x))
  rows = np.asarray(x).argmax(axis=1)
  is_kept = np.abs(change).max(axis=1) > 1e-6
  assert 0 < is_kept.sum() < len(rows)  # both cases occur
  np.testing.assert_allclose(change[is_kept], kept[rows[is_kept]], atol=1e-5)
  np.testing.assert_allclose(change[~is_kept], 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unmerge_of_merge_gives_back_the_base(dtype):
  """Bound: one rounding of the merged weight, seen through ``/ (m/n)``, is one unit in the
  last place of ``|W + sBA|``; bf16 meets it, float32 (whose own float32 arithmetic adds
  roundings of the same size) comes within two, as PEFT's float32 merge/unmerge does."""
  model = MLP()
  x = jnp.ones((1, 8))
  base = jax.tree.map(lambda v: v.astype(dtype), model.init(jax.random.key(0), x))
  params = trained(
    lora_init(base, LoraRule(".*", rank=4, alpha=8, use_dora=True), rng=jax.random.key(1)), 5
  )
  merged = merge(params)
  restored = unmerge(merged, params)
  assert jax.tree.structure(restored) == jax.tree.structure(base)
  eps_dtype, ulps = (ml_dtypes.bfloat16, 1) if dtype == jnp.bfloat16 else (np.float32, 2)
  for path, module in _modules(params):
    name = path.rsplit("/", 1)[-1]
    w = np.asarray(base["params"][name]["kernel"], np.float32)
    v = w + np.asarray(delta(module["lora_spec"], module["lora_a"], module["lora_b"]))
    m = np.asarray(merged["params"][name]["kernel"], np.float32)
    r = restored["params"][name]["kernel"]
    assert r.dtype == dtype and not np.allclose(m, w, atol=1e-2)
    ulp = np.spacing(np.maximum(np.abs(w), np.abs(v)).astype(eps_dtype)).astype(np.float32)
    assert np.all(np.abs(np.asarray(r, np.float32) - w) <= ulps * ulp), name
  # unmerge needs the base weight the adapter was merged into (for its norm)
  trainable, _ = lora_jax.partition(params, lora_jax.trainable_mask(params))
  with pytest.raises(ValueError, match="DoRA adapter at params/dense_0 needs adapted's base"):
    unmerge(merged, trainable)


def test_a_merged_model_switches_from_one_dora_adapter_to_another():
  model = MLP()
  x = jax.random.normal(jax.random.key(3), (5, 8))
  base = model.init(jax.random.key(0), x)
  rule = LoraRule(".*", rank=4, alpha=8, use_dora=True)
  task_1 = trained(lora_init(base, rule, rng=jax.random.key(1)), 1)
  task_2 = trained(lora_init(base, rule, rng=jax.random.key(2)), 2)
  deployed = merge(task_1)
  restored = unmerge(deployed, task_1)
  assert jax.tree.structure(restored) == jax.tree.structure(lora_jax.unload(task_1))
  assert jax.tree.structure(restored) == jax.tree.structure(base)
  on_restored = jax.tree.map(lambda v: v, task_2)
  for name in on_restored["params"]:
    on_restored["params"][name]["kernel"] = restored["params"][name]["kernel"]
  want = lora_apply(model.apply)(task_2, x)
  np.testing.assert_allclose(model.apply(merge(on_restored), x), want, atol=1e-5)
  assert not np.allclose(model.apply(deployed, x), want, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Training machinery, adapter files, refusals.


def test_the_magnitude_trains_and_is_counted():
  model = MLP()
  x = jax.random.normal(jax.random.key(3), (5, 8))
  params = lora_init(
    model.init(jax.random.key(0), x), LoraRule(".*", rank=2, use_dora=True), rng=jax.random.key(1)
  )
  mask = lora_jax.trainable_mask(params)
  assert mask["params"]["dense_0"]["lora_magnitude"] is True
  assert mask["params"]["dense_0"]["kernel"] is False
  trainable, frozen = lora_jax.partition(params, mask)
  tx = lora_jax.lora_optimizer(optax.adam(1e-2), params)
  state = tx.init(trainable)
  # Adam's two moments for every A, B and m; magnitudes are 16 + 16 + 4 entries
  n_adapter = sum(2 * 2 * (i + o) for i, o in ((8, 16), (16, 16), (16, 4))) + 2 * 36
  assert sum(v.size for v in jax.tree.leaves(state)) == n_adapter + 1

  def loss(t):
    return jnp.mean(lora_apply(model.apply)(lora_jax.combine(t, frozen), x) ** 2)

  grads = jax.grad(loss)(trainable)
  updates, _ = tx.update(grads, state, trainable)
  new = optax.apply_updates(trainable, updates)
  old_m, new_m = (
    trainable["params"]["dense_0"]["lora_magnitude"],
    new["params"]["dense_0"]["lora_magnitude"],
  )
  assert np.abs(np.asarray(new_m - old_m)).max() > 1e-3
  report = lora_jax.param_report(params)
  trainable_count = sum(i * 2 + 2 * o + o for i, o in ((8, 16), (16, 16), (16, 4)))
  assert report.splitlines()[0].startswith(f"trainable params: {trainable_count:,} ")
  assert "r=2 alpha=2.0 scale=1 dora" in report


def test_save_and_load_round_trip(tmp_path):
  case = CASES[2]  # scanned: the magnitude is stacked too
  base, params = _adapted(case)
  params = trained(params, 6)
  lora_jax.save_adapter(tmp_path / "a", params)
  info = lora_jax.adapter_info(tmp_path / "a")
  (record,) = info["adapters"]
  assert record["use_dora"] is True and record["stacked"] == 1
  saved = {leaf["path"]: leaf["shape"] for leaf in info["leaves"]}
  assert saved["params/layers/proj/lora_magnitude"] == [3, 8]
  loaded = lora_jax.load_adapter(tmp_path / "a", base)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # per layer and back: the stacked magnitude splits into one per layer
  per_layer = lora_jax.unstack_layers(params, "layers")
  assert per_layer["params"]["layers"]["2"]["proj"]["lora_magnitude"].shape == (8,)
  again = lora_jax.stack_layers(per_layer, "layers")
  np.testing.assert_array_equal(
    again["params"]["layers"]["proj"]["lora_magnitude"],
    params["params"]["layers"]["proj"]["lora_magnitude"],
  )


def test_dora_is_refused_where_it_is_not_supported():
  with pytest.raises(ValueError, match="use_dora='yes' must be True or False"):
    LoraRule(".*", rank=2, use_dora="yes")
  from helpers import ConvNet
  from helpers import TiedLM

  ids = jnp.ones((2, 3), jnp.int32)
  lm = TiedLM().init(jax.random.key(0), ids)
  with pytest.raises(ValueError, match=r"'params/embed' .*use_dora=True.*kind 'embed'"):
    lora_init(lm, LoraRule(["embed"], rank=2, use_dora=True), rng=jax.random.key(1))
  img = jnp.ones((1, 6, 6, 3))
  conv = ConvNet().init(jax.random.key(0), img)
  layouts = lora_jax.kernel_layouts(ConvNet(), img)
  with pytest.raises(ValueError, match=r"'params/conv' .*kind 'conv'"):
    lora_init(
      conv, LoraRule(["conv"], rank=2, use_dora=True), rng=jax.random.key(1), layouts=layouts
    )
  x3 = jnp.ones((2, 5, 8))
  heads = Heads().init(jax.random.key(0), x3)
  with pytest.raises(ValueError, match=r"'params/mix' .*kind 'einsum'"):
    lora_init(
      heads,
      LoraRule(["mix"], rank=2, use_dora=True),
      rng=jax.random.key(1),
      layouts=lora_jax.kernel_layouts(Heads(), x3),
    )
  # a 2-D einsum kernel looks linear without layouts; the low-rank path refuses it by name
  x = jnp.ones((2, 8))
  params = lora_init(
    EinsumNet().init(jax.random.key(0), x),
    LoraRule(["mix"], rank=2, use_dora=True),
    rng=jax.random.key(1),
  )
  with pytest.raises(ValueError, match=r"'params/mix' \(Einsum\) carries a DoRA adapter"):
    lora_apply(EinsumNet().apply)(params, x)


# ---------------------------------------------------------------------------------------------
# PEFT both ways: a tiny random BERT and a tiny random Llama (biases, tied head), float32.

ATOL = 1e-4
BERT = dict(TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _same_adapters(got, want):
  """The same leaves, bit for bit, and the same adapter settings (PEFT keeps no rule text)."""
  flat = [
    {paths.keypath_str(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(t)}
    for t in (got, want)
  ]
  assert sorted(flat[0]) == sorted(flat[1])
  for k, w in flat[1].items():
    assert flat[0][k].dtype == w.dtype, k
    np.testing.assert_array_equal(flat[0][k], w, err_msg=k)

  def specs(tree):
    return {
      p: (s.rank, s.alpha, s.rslora, s.dropout, s.use_dora)
      for p, m in _modules(tree)
      for s in [m["lora_spec"]]
    }

  assert specs(got) == specs(want)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  from lora_jax.models import from_pretrained

  config = transformers.BertConfig(**BERT)
  folder = tmp_path_factory.mktemp("tiny-bert-dora")
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(config).eval()
  with torch.no_grad():  # O(1) logits (BERT's 0.02 init gives near-zero ones to compare)
    for name, p in model.named_parameters():
      if p.ndim == 2 and "embeddings" not in name:
        p.normal_(0.0, p.shape[1] ** -0.5)
      elif name.endswith("bias") and "LayerNorm" not in name:
        p.normal_(0.0, 0.2)
  model.save_pretrained(folder)
  module, base = from_pretrained(folder, "sequence-classification")
  rng = np.random.RandomState(0)
  ids = rng.randint(1, BERT["vocab_size"], (3, 7))
  mask = np.ones_like(ids)
  mask[1, 4:] = 0
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
  return config, folder, module, base, batch


def _bert_torch(folder):
  return transformers.BertForSequenceClassification.from_pretrained(folder)


def _torch_logits(model, batch):
  import torch

  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
  return out.logits.numpy()


def test_bert_export_loads_in_peft_with_the_same_logits(bert, tmp_path):
  import json

  import peft

  config, folder, module, base, batch = bert
  rule = LoraRule(["query", "key", "value", "dense"], rank=4, alpha=8, use_dora=True)
  params = trained(lora_init(base, rule, rng=jax.random.key(1)), 7)
  ours = np.asarray(jax.jit(lora_apply(module.apply))(params, *batch.values()))
  assert np.abs(ours - np.asarray(module.apply(base, *batch.values()))).max() > 0.05
  lora_jax.export_peft(
    tmp_path,
    params,
    base_model_name_or_path=str(folder),
    config=config,
    extra_trainable=["classifier"],  # SEQ_CLS: PEFT expects the head among the weights
  )
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg["use_dora"] is True
  names = peft.utils.load_peft_weights(str(tmp_path))
  assert names[
    "base_model.model.bert.encoder.layer.1.output.dense.lora_magnitude_vector"
  ].shape == (32,)
  model = peft.PeftModel.from_pretrained(_bert_torch(folder), tmp_path).eval()
  np.testing.assert_allclose(_torch_logits(model, batch), ours, atol=ATOL, rtol=0)
  _same_adapters(lora_jax.import_peft(tmp_path, base, config=config), params)


def _peft_dora_bert(folder, tmp_path, dropout=0.0):
  """A PEFT DoRA adapter on the tiny BERT, B random and each magnitude off its start."""
  import peft
  import torch

  torch.manual_seed(1)
  lora = peft.LoraConfig(
    r=4, lora_alpha=8, target_modules=["query", "value"], use_dora=True, lora_dropout=dropout
  )
  model = peft.get_peft_model(_bert_torch(folder), lora)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
      if "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.2 * torch.randn_like(p))
  model.eval().save_pretrained(tmp_path)
  return model


def test_peft_dora_adapter_imports_to_the_same_logits_and_gradients(bert, tmp_path):
  import torch

  config, folder, module, base, batch = bert
  model = _peft_dora_bert(folder, tmp_path / "peft")
  want = _torch_logits(model, batch)
  params = lora_jax.import_peft(tmp_path / "peft", base, config=config)
  q = params["params"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]
  assert q["lora_spec"].use_dora and q["lora_magnitude"].shape == (32,)
  apply = lora_apply(module.apply)
  got = np.asarray(jax.jit(apply)(params, *batch.values()))
  assert np.abs(want - np.asarray(module.apply(base, *batch.values()))).max() > 0.05
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

  # and back: the very tensors PEFT wrote
  lora_jax.export_peft(tmp_path / "again", params, base_model_name_or_path="x", config=config)
  from lora_jax._src.files import read_safetensors

  theirs = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
  mine = read_safetensors(tmp_path / "again" / "adapter_model.safetensors")
  assert sorted(mine) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)

  # gradients of m, A, B: PEFT's autograd (its norm detached) against our low-rank path
  g = np.random.RandomState(2).randn(*want.shape).astype(np.float32)
  model.train()
  out = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits
  (out * torch.tensor(g)).sum().backward()
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params))
  grads = jax.grad(lambda t: jnp.sum(apply(lora_jax.combine(t, frozen), *batch.values()) * g))(
    trainable
  )
  layer = model.base_model.model.bert.encoder.layer[1].attention.self.query
  ours = grads["params"]["encoder"]["layer"]["1"]["attention"]["self"]["query"]
  pairs = [
    (ours["lora_a"], layer.lora_A["default"].weight.grad.numpy().T),
    (ours["lora_b"], layer.lora_B["default"].weight.grad.numpy().T),
    (ours["lora_magnitude"], layer.lora_magnitude_vector["default"].weight.grad.numpy()),
  ]
  for name, (mine_g, theirs_g) in zip(("A", "B", "m"), pairs, strict=True):
    scale = np.abs(theirs_g).max()
    assert scale > 0, name
    np.testing.assert_allclose(np.asarray(mine_g), theirs_g, atol=1e-4 * scale, err_msg=name)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  from llm import config
  from llm import save_checkpoint

  name = "llama-tied-bias-llama3"  # biases on every projection, a tied head, llama3 RoPE
  return save_checkpoint(config(name), tmp_path_factory.mktemp(name), gain=0.6)


@pytest.mark.parametrize("scan", [True], ids=["scan"])  # per-layer naming: the scan is harder
def test_llama_export_loads_in_peft_with_the_same_logits(llama, scan, tmp_path):
  import peft
  from llm import max_error
  from llm import mixed_batch
  from llm import torch_logits

  from lora_jax.models import from_pretrained

  module, variables = from_pretrained(llama.folder, scan_layers=scan)
  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 2), jnp.int32))
  rule = LoraRule("all-linear", rank=4, alpha=8, use_dora=True)
  params = trained(lora_init(variables, rule, rng=jax.random.key(1), layouts=layouts), 8, 0.1)
  ids, mask = mixed_batch(llama.config)
  ours = jax.jit(lora_apply(module.apply))(params, ids, mask)
  assert max_error(ours, module.apply(variables, ids, mask), mask) > 0.1
  folder = lora_jax.export_peft(
    tmp_path, params, base_model_name_or_path="x", config=llama.config, task_type="CAUSAL_LM"
  )
  names = peft.utils.load_peft_weights(str(folder))
  assert len(names) == 3 * 7 * 3  # A, B and m per layer and projection
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(llama.folder).eval()
  peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
  assert max_error(ours, torch_logits(peft_model, ids, mask), mask) <= ATOL


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_llama_peft_dora_adapter_imports_to_peft_logits(llama, scan, tmp_path):
  import peft
  import torch
  from llm import max_error
  from llm import mixed_batch
  from llm import torch_logits

  from lora_jax.models import from_pretrained

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(llama.folder).eval()
  peft_config = peft.LoraConfig(
    r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True
  )
  peft_model = peft.get_peft_model(torch_model, peft_config)
  torch.manual_seed(3)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.2)
      if "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.2 * torch.randn_like(p))
  peft_model.eval().save_pretrained(tmp_path)
  module, variables = from_pretrained(llama.folder, scan_layers=scan)
  params = lora_jax.import_peft(tmp_path, variables, config=llama.config)
  ids, mask = mixed_batch(llama.config)
  ref = torch_logits(peft_model, ids, mask)
  assert max_error(ref, module.apply(variables, ids, mask), mask) > 0.1
  ours = jax.jit(lora_apply(module.apply))(params, ids, mask)
  assert max_error(ours, ref, mask) <= ATOL
  np.testing.assert_allclose(
    module.apply(merge(params), ids, mask)[np.asarray(mask, bool)],
    np.asarray(ours)[np.asarray(mask, bool)],
    atol=ATOL,
  )


def test_peft_dora_on_embeddings_is_refused_by_name(bert, tmp_path):
  import peft

  config, folder, _, base, _ = bert
  lora = peft.LoraConfig(r=2, target_modules=["word_embeddings"], use_dora=True)
  peft.get_peft_model(_bert_torch(folder), lora).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="'bert.embeddings.word_embeddings' is a DoRA embedding"):
    lora_jax.import_peft(tmp_path, base, config=config)
