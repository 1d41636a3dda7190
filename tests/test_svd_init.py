"""PiSSA and OLoRA initialisation: outputs unchanged at step 0, PEFT's init on the same weights,
and the rank-2r export that PEFT loads on the original base."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from helpers import MLP
from helpers import TINY_BERT
from helpers import ConvNet
from helpers import Heads
from helpers import TiedLM

import lora_jax
from lora_jax import LoraRule
from lora_jax import export_peft
from lora_jax import lora_apply
from lora_jax import lora_init
from lora_jax._src import paths
from lora_jax._src import svd_init

INITS = ["pissa", "pissa_niter_2", "olora"]


def _adapters(tree) -> dict:
  """``{module path: module}`` for the adapted modules."""
  modules = paths.iter_modules(paths.split_params(tree)[0])
  return {p: m for p, m in modules if "lora_spec" in m}


def _weights(tree) -> dict:
  return {paths.keypath_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _product(module):
  """``s * B_t @ A_t`` in transformers' ``[out, in]`` layout (float64)."""
  spec = module["lora_spec"]
  a, b = (np.asarray(module[k], np.float64) for k in ("lora_a", "lora_b"))
  return spec.scale * (a @ b).T


def _perturb(params, seed, scale=0.3):
  """A and B moved by ``scale`` times their own RMS, as training would move them."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.RandomState(seed)
  out = []
  for kp, leaf in leaves:
    if paths.keypath_str(kp).rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
      x = np.asarray(leaf)
      leaf = (x + scale * np.sqrt(np.mean(x**2)) * rng.randn(*x.shape)).astype(np.float32)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Rules and refusals.


def test_rule_accepts_the_inits_and_names_the_choices():
  for init in ("pissa", "olora", "pissa_niter_4", "pissa_niter_16"):
    assert LoraRule(".*", rank=2, init=init).init == init
  for bad in ("pissa_niter_0", "pissa_niter_K", "pissa_niter_", "pissa_niter_-1", "svd", 3):
    with pytest.raises(ValueError, match=r"init=.*not one of .*'pissa_niter_K', 'olora'"):
      LoraRule(".*", rank=2, init=bad)


def test_embeddings_and_ranks_above_the_weights_are_refused():
  base = TiedLM().init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"params/embed/embedding.*linear kernels only"):
    lora_init(base, LoraRule(["embed"], rank=2, init="pissa"), rng=jax.random.key(1))
  mlp = MLP().init(jax.random.key(0), jnp.ones((1, 8)))
  # dense_2 is 16 -> 4: rank 5 fits plain LoRA (max 16) but not PiSSA/OLoRA (min 4)
  lora_init(mlp, LoraRule(["dense_2"], rank=5), rng=jax.random.key(1))
  with pytest.raises(ValueError, match=r"rank 5 .*params/dense_2/kernel.*at most 4"):
    lora_init(mlp, LoraRule(["dense_2"], rank=5, init="olora"), rng=jax.random.key(1))
  # a quantized kernel: the order that works (lora_init first, then quantize) is named
  quantized = lora_jax.quantize(mlp, ["dense_1"])
  with pytest.raises(ValueError, match=r"dense_1/kernel is quantized.*lora_init on the float"):
    lora_init(quantized, LoraRule(["dense_1"], rank=2, init="pissa"), rng=jax.random.key(1))
  residual = lora_init(mlp, LoraRule(["dense_1"], rank=2, init="pissa"), rng=jax.random.key(1))
  assert isinstance(
    lora_jax.quantize(residual, ["dense_1"])["params"]["dense_1"]["kernel"], lora_jax.QuantizedArray
  )


# ---------------------------------------------------------------------------------------------
# Step 0: same outputs, the residual written back, merge gives the original weights.


@pytest.mark.parametrize("init", INITS)
def test_dense_mlp_outputs_unchanged_at_step_0(init):
  model = MLP(features=(24, 32, 8))
  x = jax.random.normal(jax.random.key(3), (5, 16))
  base = model.init(jax.random.key(0), x)
  adapted = lora_init(base, LoraRule(".*", rank=4, alpha=12, init=init), rng=jax.random.key(1))
  for path, module in _adapters(adapted).items():
    w = base["params"][path.rsplit("/", 1)[-1]]["kernel"]
    assert module["lora_spec"].init == init
    assert module["kernel"].dtype == w.dtype
    # the weight was replaced by a residual, which the adapter's product makes up for
    assert float(jnp.abs(module["kernel"] - w).max()) > 0.1
    np.testing.assert_allclose(module["kernel"] + _product(module).T, w, atol=1e-6, rtol=0)
  want = model.apply(base, x)
  np.testing.assert_allclose(lora_apply(model.apply)(adapted, x), want, atol=1e-5, rtol=0)
  merged = lora_jax.merge(adapted)  # residual + s*A@B: the original weights
  for path, w in _weights(base).items():
    np.testing.assert_allclose(_weights(merged)[path], w, atol=1e-6, rtol=0, err_msg=path)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_multi_axis_kernels_outputs_unchanged_at_step_0(init):
  """DenseGeneral over heads, Einsum and Conv kernels: decomposed as [inputs, outputs]."""
  rule = LoraRule(".*", rank=3, alpha=5, init=init)
  for model, x in [
    (Heads(), jax.random.normal(jax.random.key(2), (2, 3, 8))),
    (ConvNet(), jax.random.normal(jax.random.key(2), (2, 6, 6, 3))),
  ]:
    base = model.init(jax.random.key(0), x)
    layouts = lora_jax.kernel_layouts(model, x)
    adapted = lora_init(base, rule, rng=jax.random.key(1), layouts=layouts)
    assert len(_adapters(adapted)) in (2, 3)
    for module in _adapters(adapted).values():
      assert module["lora_spec"].in_axes != (0,) or module["kernel"].ndim > 2
    want = model.apply(base, x)
    assert float(jnp.abs(model.apply(lora_jax.unload(adapted), x) - want).max()) > 0.1
    np.testing.assert_allclose(lora_apply(model.apply)(adapted, x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", INITS)
def test_bfloat16_weights_keep_their_dtype(init):
  model = MLP(features=(24, 8), param_dtype=jnp.bfloat16)
  base = model.init(jax.random.key(0), jnp.ones((1, 16)))
  adapted = lora_init(base, LoraRule(".*", rank=4, alpha=8, init=init), rng=jax.random.key(1))
  for path, module in _adapters(adapted).items():
    w = np.asarray(base["params"][path.rsplit("/", 1)[-1]]["kernel"], np.float32)
    assert module["kernel"].dtype == jnp.bfloat16
    assert module["lora_a"].dtype == module["lora_b"].dtype == jnp.float32
    # residual formed in float32, then rounded once to bfloat16 (relative error <= 2^-8)
    residual = np.asarray(module["kernel"], np.float32)
    exact = w - _product(module).T
    assert np.all(np.abs(residual - exact) <= 2**-8 * np.abs(exact) + 1e-6)


def test_abstract_params_give_shapes_only():
  model = MLP(features=(24, 8))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16)))
  rule = LoraRule(".*", rank=4, init="pissa_niter_2")
  adapted = lora_init(shapes, rule, rng=jax.random.key(1))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(adapted))
  module = adapted["params"]["dense_0"]
  assert (module["lora_a"].shape, module["lora_b"].shape) == ((16, 4), (4, 24))
  assert module["kernel"] == shapes["params"]["dense_0"]["kernel"]


def test_randomized_svd_finds_the_top_subspace():
  """pissa_niter_K against exact PiSSA on a weight with a decaying spectrum."""
  ku, kv = jax.random.split(jax.random.key(0))
  u, _ = jnp.linalg.qr(jax.random.normal(ku, (48, 32)))
  v, _ = jnp.linalg.qr(jax.random.normal(kv, (40, 32)))
  w = (u * 0.7 ** jnp.arange(32)) @ v.T  # [in=48, out=40], singular values 0.7^i
  base = {"proj": {"kernel": w}}
  exact = lora_init(base, LoraRule(["proj"], rank=6, init="pissa"), rng=jax.random.key(1))
  fast = lora_init(base, LoraRule(["proj"], rank=6, init="pissa_niter_2"), rng=jax.random.key(2))
  err = np.abs(_product(fast["proj"]) - _product(exact["proj"])).max()
  assert err < 1e-5, err
  # no oversampling, no subspace iteration: visibly worse, so the test above has teeth
  _, s, _ = svd_init.randomized_svd(w.T, 6, 0, jax.random.key(2), oversample=0)
  assert np.abs(np.asarray(s) - 0.7 ** np.arange(6)).max() > 1e-3


def test_save_and_load_keep_the_init(tmp_path):
  base = MLP(features=(24, 8)).init(jax.random.key(0), jnp.ones((1, 16)))
  adapted = lora_init(base, LoraRule(".*", rank=4, init="olora"), rng=jax.random.key(1))
  lora_jax.save_adapter(tmp_path / "a", adapted)
  assert {r["init"] for r in lora_jax.adapter_info(tmp_path / "a")["adapters"]} == {"olora"}
  loaded = lora_jax.load_adapter(tmp_path / "a", adapted)
  assert {m["lora_spec"].init for m in _adapters(loaded).values()} == {"olora"}
  # into the original base it would be another model: refused, saying where it does fit
  with pytest.raises(ValueError, match="started from init='olora'.*residual weights"):
    lora_jax.load_adapter(tmp_path / "a", base)


# ---------------------------------------------------------------------------------------------
# Against PEFT's own PiSSA and OLoRA on the same weights.


def _aligned(ours, theirs, axis):
  """``ours`` with each rank component's sign flipped to agree with ``theirs`` (the
  decompositions fix each singular/QR direction up to its sign only)."""
  other = tuple(i for i in range(ours.ndim) if i != axis)
  signs = np.sign(np.sum(ours * theirs, axis=other, keepdims=True))
  return ours * signs


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_init_as_peft(init, rslora):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.up = torch.nn.Linear(16, 24)  # weight [out=24, in=16]
      self.down = torch.nn.Linear(24, 10)

    def forward(self, x):
      return self.down(torch.relu(self.up(x)))

  torch.manual_seed(0)
  net = Net()
  weights = {n: getattr(net, n).weight.detach().numpy().copy() for n in ("up", "down")}
  config = peft.LoraConfig(
    r=4, lora_alpha=6, use_rslora=rslora, target_modules=["up", "down"], init_lora_weights=init
  )
  ref = peft.get_peft_model(net, config)
  base = {n: {"kernel": jnp.asarray(w.T)} for n, w in weights.items()}
  rule = LoraRule(["up", "down"], rank=4, alpha=6, rslora=rslora, init=init)
  ours = lora_init(base, rule, rng=jax.random.key(0))
  for name in ("up", "down"):
    layer = getattr(ref.base_model.model, name)
    a_t = layer.lora_A["default"].weight.detach().numpy()  # [r, in]
    b_t = layer.lora_B["default"].weight.detach().numpy()  # [out, r]
    residual = layer.base_layer.weight.detach().numpy()
    module = ours[name]
    assert module["lora_spec"].scale == pytest.approx(layer.scaling["default"])
    np.testing.assert_allclose(np.asarray(module["kernel"]).T, residual, atol=2e-6, rtol=0)
    want = layer.scaling["default"] * b_t.astype(np.float64) @ a_t
    np.testing.assert_allclose(_product(module), want, atol=2e-6, rtol=0)
    # each factor too, up to the sign of each rank component (the split of S between them)
    a, b = np.asarray(module["lora_a"]), np.asarray(module["lora_b"])
    np.testing.assert_allclose(_aligned(a, a_t.T, axis=1), a_t.T, atol=2e-5, rtol=0)
    np.testing.assert_allclose(_aligned(b, b_t.T, axis=0), b_t.T, atol=2e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_rank_2r_export_is_what_peft_writes(rslora, tmp_path):
  """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) on the same factors
  writes the same config and tensors as export_peft(..., initial=...)."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  net = torch.nn.Sequential()
  net.add_module("up", torch.nn.Linear(16, 24))
  net.add_module("down", torch.nn.Linear(24, 10))
  base = {
    n: {"kernel": jnp.asarray(getattr(net, n).weight.detach().numpy().T)} for n in net._modules
  }
  rule = LoraRule(["up", "down"], rank=4, alpha=6, rslora=rslora, init="pissa")
  initial = lora_init(base, rule, rng=jax.random.key(0))
  trained = _perturb(initial, seed=1)
  ref = peft.get_peft_model(
    net,
    peft.LoraConfig(
      r=4, lora_alpha=6, use_rslora=rslora, target_modules=["up", "down"], init_lora_weights="pissa"
    ),
  )

  def load(tree):  # our factors into PEFT's layers (the residual bases agree already)
    with torch.no_grad():
      for name in ("up", "down"):
        layer = getattr(ref.base_model.model, name)
        layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(tree[name]["lora_a"]).T))
        layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(tree[name]["lora_b"]).T))

  load(initial)
  ref.peft_config["default"].init_lora_weights = True  # as PEFT's docs do for the initial copy
  ref.save_pretrained(tmp_path / "initial")
  load(trained)
  ref.save_pretrained(
    tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial")
  )
  export_peft(
    tmp_path / "ours", trained, base_model_name_or_path="x", task_type=None, initial=initial
  )
  theirs, mine = (
    json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")
  )
  for key in ("r", "lora_alpha", "use_rslora", "init_lora_weights", "rank_pattern"):
    assert mine[key] == pytest.approx(theirs[key]), key
  assert mine["r"] == 8
  from safetensors.numpy import load_file

  theirs, mine = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
  assert sorted(mine) == sorted(theirs)
  for key in theirs:
    np.testing.assert_allclose(mine[key], theirs[key], atol=1e-6, rtol=0, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Real model families: step 0 and the rank-2r export on the original base in PEFT.


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
  torch = pytest.importorskip("torch")
  config = transformers.BertConfig(**TINY_BERT)
  folder = tmp_path_factory.mktemp("bert")
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(config).eval()
  with torch.no_grad():  # O(1) logits (the 0.02 init makes every logit nearly 0)
    for p in model.parameters():
      if p.ndim == 2:
        p.normal_(0.0, p.shape[1] ** -0.5)
  model.save_pretrained(folder)
  return config, folder


def _torch_logits(model, *arrays):
  torch = pytest.importorskip("torch")
  ids, mask, types = (torch.tensor(np.asarray(a)) for a in arrays)
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.numpy()


@pytest.mark.parametrize("init", INITS)
def test_bert_step_0_and_rank_2r_export_in_peft(bert, init, tmp_path):
  peft = pytest.importorskip("peft")
  from lora_jax.models import from_pretrained

  config, folder = bert
  module, base = from_pretrained(folder, "sequence-classification")
  rng = np.random.RandomState(0)
  ids = rng.randint(1, TINY_BERT["vocab_size"], (3, 7))
  mask = np.ones_like(ids)
  mask[1, 4:] = 0
  batch = (ids, mask, np.zeros_like(ids))
  rule = LoraRule(["query", "value", "intermediate.dense"], rank=4, alpha=8, init=init)
  initial = lora_init(base, rule, rng=jax.random.key(1))
  apply = jax.jit(lora_apply(module.apply))
  want = module.apply(base, *batch)
  np.testing.assert_allclose(apply(initial, *batch), want, atol=1e-5, rtol=0)

  trained = _perturb(initial, seed=2)
  ours = np.asarray(apply(trained, *batch))
  assert np.abs(ours - want).max() > 0.05  # the trained adapters matter
  export_peft(
    tmp_path,
    trained,
    base_model_name_or_path=str(folder),
    config=config,
    extra_trainable="classifier",  # SEQ_CLS: PEFT expects the head among modules_to_save
    initial=initial,
  )
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
  original = transformers.BertForSequenceClassification.from_pretrained(folder)
  model = peft.PeftModel.from_pretrained(original, tmp_path).eval()
  np.testing.assert_allclose(ours, _torch_logits(model, *batch), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  from llm import config
  from llm import save_checkpoint

  name = "llama-tied-bias-llama3"
  return save_checkpoint(config(name), tmp_path_factory.mktemp(name), gain=0.6)


@pytest.mark.parametrize("init", ["pissa"])  # the other starts: the BERT test above
def test_scanned_llama_step_0_and_rank_2r_export_in_peft(llama, init, tmp_path):
  peft = pytest.importorskip("peft")
  from llm import max_error
  from llm import mixed_batch
  from llm import torch_logits

  from lora_jax.models import from_pretrained

  module, base = from_pretrained(llama.folder, scan_layers=True)
  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 2), jnp.int32))
  rule = LoraRule("all-linear", rank=4, alpha=8, init=init)
  initial = lora_init(base, rule, rng=jax.random.key(1), layouts=layouts)
  q = initial["params"]["model"]["layers"]["self_attn"]["q_proj"]
  assert q["lora_spec"].stacked == 1 and q["lora_a"].shape[0] == llama.config.num_hidden_layers
  if init != "pissa_niter_2":  # per layer, scanned or not: the same decomposition
    _, loop = from_pretrained(llama.folder)
    per_layer = lora_init(loop, rule, rng=jax.random.key(1))
    q1 = per_layer["params"]["model"]["layers"]["1"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(q["kernel"][1], q1["kernel"], atol=1e-6, rtol=0)
  ids, mask = mixed_batch(llama.config)
  apply = jax.jit(lora_apply(module.apply))
  want = module.apply(base, ids, mask)
  assert max_error(apply(initial, ids, mask), want, mask) <= 1e-5

  trained = _perturb(initial, seed=2)
  ours = apply(trained, ids, mask)
  assert max_error(ours, want, mask) > 0.05
  export_peft(
    tmp_path,
    trained,
    base_model_name_or_path=str(llama.folder),
    config=llama.config,
    task_type="CAUSAL_LM",
    initial=initial,
  )
  original = transformers.AutoModelForCausalLM.from_pretrained(llama.folder).eval()
  model = peft.PeftModel.from_pretrained(original, tmp_path).eval()
  assert max_error(ours, torch_logits(model, ids, mask), mask) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Export refusals.


def test_export_without_or_with_a_mismatched_initial_is_refused(tmp_path):
  base = MLP(features=(24, 8)).init(jax.random.key(0), jnp.ones((1, 16)))
  base = {"params": {"net": base["params"]}}
  rule = LoraRule(["dense_0", "dense_1"], rank=4, alpha=8, init="pissa_niter_2")
  initial = lora_init(base, rule, rng=jax.random.key(1))
  trained = _perturb(initial, seed=0)
  export = lambda **kw: export_peft(tmp_path / "x", trained, base_model_name_or_path="m", **kw)  # noqa: E731
  with pytest.raises(ValueError, match=r"init='pissa_niter_2'.*residual.*pass initial="):
    export()
  with pytest.raises(ValueError, match=r"initial= carries no adapters"):
    export(initial=base)
  other_rank = lora_init(
    base, LoraRule(["dense_0", "dense_1"], rank=2, init="pissa"), rng=jax.random.key(1)
  )
  with pytest.raises(ValueError, match=r"LoraSpec differs in \['rank', 'alpha', 'init'\]"):
    export(initial=other_rank)
  one = lora_init(
    base, LoraRule(["dense_0"], rank=4, alpha=8, init="pissa_niter_2"), rng=jax.random.key(1)
  )
  with pytest.raises(ValueError, match=r"no adapter at \['params/net/dense_1'\]"):
    export(initial=one)
  other_key = lora_init(base, rule, rng=jax.random.key(2))  # another random residual
  with pytest.raises(ValueError, match=r"dense_0/kernel differs from initial="):
    export(initial=other_key)
  assert not (tmp_path / "x").exists()
  assert export(initial=initial).is_dir()
