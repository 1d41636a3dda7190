"""QLoRA's frozen base: NF4 codes against bitsandbytes, the int8 bound, the low-rank path on a
quantized base against the dense reference (scanned Llama included), streaming quantization in
``from_pretrained``, frozen leaves, merge/export/report, memory without allocating, and (slow)
the perplexity of SmolLM2-135M-Instruct with an NF4 base."""

from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO
from helpers import MLP
from helpers import Heads
from helpers import TiedLM
from llm import config
from llm import randomize_adapters
from llm import save_checkpoint

import lora_jax
from lora_jax import Quantization
from lora_jax import QuantizedArray
from lora_jax import dequantize
from lora_jax import quantize
from lora_jax.models import from_config
from lora_jax.models import from_pretrained
from lora_jax.quant import array as qarray
from lora_jax.quant import kernel as qkernel
from lora_jax.quant import nf4

# (out, in) as transformers stores the weight: partial last blocks, an odd number of values,
# a block size other than 64, more than 256 absmaxes (several double-quant blocks).
SHAPES = [((37, 51), 64), ((256, 512), 64), ((130, 77), 128), ((333, 1000), 32)]


def _weight(shape, seed):
  rng = np.random.RandomState(seed)
  # rows of very different scales, as real weights have; some exact zeros
  w = rng.randn(*shape) * rng.gamma(1.0, 1.0, size=(shape[0], 1))
  w[0, :5] = 0.0
  return w.astype(np.float32)


def _ours(w_out_in, block_size, double_quant, dtype=jnp.float32) -> QuantizedArray:
  tree = {"m": {"kernel": jnp.asarray(w_out_in.T, dtype)}}  # Flax layout [in, out]
  return quantize(tree, ["m"], block_size=block_size, double_quant=double_quant)["m"]["kernel"]


def _bnb_state(w_out_in, block_size, double_quant, dtype):
  torch = pytest.importorskip("torch")
  functional = pytest.importorskip("bitsandbytes.functional")
  t = torch.from_numpy(w_out_in).to(getattr(torch, jnp.dtype(dtype).name))
  packed, state = functional.quantize_4bit(
    t, blocksize=block_size, quant_type="nf4", compress_statistics=double_quant
  )
  return functional, packed, state


def _as_ours(packed, state, w_shape, block_size, dtype) -> QuantizedArray:
  """bitsandbytes' 4-bit state read into our node, one array to one child."""
  nested = state.state2 is not None
  return QuantizedArray(
    jnp.asarray(packed.numpy().reshape(-1)),
    jnp.asarray(state.absmax.numpy()),
    jnp.asarray(state.state2.absmax.numpy()) if nested else None,
    jnp.asarray(state.offset.numpy()) if nested else None,
    kind="nf4",
    block_size=block_size,
    double_quant=nested,
    layer_shape=w_shape[::-1],
    dtype=dtype,
  )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(("shape", "block_size"), SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_nf4_codes_and_absmax_equal_bitsandbytes(shape, block_size, dtype):
  w = _weight(shape, seed=sum(shape))
  functional, packed, state = _bnb_state(w, block_size, False, dtype)
  ours = _ours(w, block_size, False, dtype)
  np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
  np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
  # dequantized: the same float32 products, cast to the weight's dtype
  ref = functional.dequantize_4bit(packed, state).float().numpy()
  got = np.asarray(dequantize(ours), np.float32).T
  assert dequantize(ours).dtype == dtype and dequantize(ours).shape == w.T.shape
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize(("shape", "block_size"), SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_nf4_double_quant_equals_bitsandbytes(shape, block_size):
  w = _weight(shape, seed=sum(shape) + 1)
  functional, packed, state = _bnb_state(w, block_size, True, jnp.float32)
  ours = _ours(w, block_size, True)
  np.testing.assert_array_equal(np.asarray(ours.codes), packed.numpy().reshape(-1))
  # The offset is the float32 mean of the absmaxes; its last bits depend on the order of the
  # sum (PyTorch's cascade vs XLA's), so it may differ by an ulp or two ...
  offset = float(state.offset)
  assert abs(float(ours.offset) - offset) <= 2 * np.spacing(np.float32(offset))
  # ... and given bitsandbytes' offset, the 8-bit absmax codes and second-level absmaxes are
  # bitsandbytes' exactly.
  _, plain = _bnb_state(w, block_size, False, jnp.float32)[1:]
  codes, absmax2, _ = nf4._absmax_quant(jnp.asarray(plain.absmax.numpy()), offset)
  np.testing.assert_array_equal(np.asarray(codes), state.absmax.numpy())
  np.testing.assert_array_equal(np.asarray(absmax2), state.state2.absmax.numpy())
  # A bitsandbytes state maps one to one onto our node and dequantizes to its values (within
  # float32 rounding: an entry of the 8-bit map may differ by an ulp, see _dynamic_map).
  ref = functional.dequantize_4bit(packed, state).numpy()
  got = np.asarray(dequantize(_as_ours(packed, state, shape, block_size, jnp.float32))).T
  eps = np.finfo(np.float32).eps  # absmax = code * absmax2 + offset: a few roundings of absmax
  np.testing.assert_allclose(got, ref, rtol=0, atol=4 * eps * np.abs(ref).max())
  # our own full path stays within the double quantization's error of the weight
  mine = np.asarray(dequantize(ours)).T
  assert np.abs(mine - ref).max() <= 0.01 * np.abs(w).max()


def test_dynamic_map_is_bitsandbytes_map():
  functional = pytest.importorskip("bitsandbytes.functional")
  ref = functional.create_dynamic_map().numpy()
  ulps = np.abs(nf4.DYNAMIC_MAP.view(np.int32) - ref.view(np.int32))
  assert ulps.max() <= 1  # each entry within one float32 rounding
  # and the 65,536-point quantization grid picks the same entries as bitsandbytes' CPU kernel
  torch = pytest.importorskip("torch")
  x = np.random.RandomState(0).uniform(-1, 1, 2**16).astype(np.float32)
  x[:2] = [1.0, -1.0]
  q, _ = functional.quantize_blockwise(torch.from_numpy(x), blocksize=256)
  blocks, _ = nf4._blocks(jnp.asarray(x), 256)
  amax = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(nf4._dynamic_codes(blocks * (1.0 / amax))).ravel(), q)


@pytest.mark.parametrize("stacked", [0, 2])
def test_int8_round_trip_within_half_a_step(stacked):
  shape = (3, 2)[:stacked] + (96, 40)
  w = np.random.RandomState(1).randn(*shape).astype(np.float32) * np.linspace(0.01, 9.0, 40)
  w[..., 3] = 0.0  # an all-zero output unit
  layouts = {"params/m": lora_jax.KernelLayout((0,), (1,), "dense", stacked)}
  q = quantize({"m": {"kernel": jnp.asarray(w)}}, ["m"], kind="int8", layouts=layouts)
  q = q["m"]["kernel"]
  assert q.codes.dtype == jnp.int8 and q.shape == shape and q.stacked == stacked
  err = np.abs(np.asarray(dequantize(q)) - w)
  bound = np.abs(w).max(axis=-2, keepdims=True) / 127 / 2  # half a step, per output unit
  assert (err <= bound * (1 + 1e-6) + 1e-30).all()
  assert err[..., 3].max() == 0.0
  assert err.max() > 0.5 * bound.max()  # the bound is nearly reached: it is the tight one


def _adapted(module_or_params, rule, kind, layouts=None, seed=0):
  q = quantize(module_or_params, rule.pattern, kind=kind, layouts=layouts)
  adapted = lora_jax.lora_init(q, rule, rng=jax.random.key(1), layouts=layouts)
  return randomize_adapters(adapted, seed)


def _loss(apply, x):
  def loss(trainable, frozen):
    return jnp.mean(jnp.square(apply(lora_jax.combine(trainable, frozen), x)))

  return loss


def _outputs_and_grads(apply, params, x):
  """``apply(params, x)`` and the gradients of a loss of it with respect to the adapters (one
  compiled program)."""

  def loss(trainable, frozen):
    y = apply(lora_jax.combine(trainable, frozen), x)
    return jnp.mean(jnp.square(y.astype(jnp.float32))), y

  t, f = lora_jax.partition(params, lora_jax.trainable_mask(params))
  (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(t, f)
  return y, grads


# Two diagonal cases of the kind x dtype grid: NF4 and int8 each dequantize once, and float32
# (the tight tolerance) and bfloat16 each compute once; the other two ran the same paths.
@pytest.mark.parametrize(
  ("kind", "dtype", "tol"),
  [("nf4", jnp.float32, 1e-5), ("int8", jnp.bfloat16, 3e-2)],
  ids=["f32-nf4", "bf16-int8"],
)
def test_low_rank_path_on_quantized_base_matches_dense_reference(kind, dtype, tol):
  model = MLP(features=(128, 64, 8), dtype=dtype, param_dtype=dtype)
  x = jax.random.normal(jax.random.key(2), (5, 96), dtype)
  base = quantize(model.init(jax.random.key(0), x), ".*dense_.", kind=kind)
  rule = lora_jax.LoraRule(["dense_0", "dense_2"], rank=4, alpha=8)  # dense_1: quantized only
  adapted = randomize_adapters(lora_jax.lora_init(base, rule, rng=jax.random.key(3)), 1)
  assert isinstance(adapted["params"]["dense_1"]["kernel"], QuantizedArray)
  apply = lora_jax.lora_apply(model.apply)
  # the reference: the dense weights dequantize(W), the adapters as they are
  dense = qkernel.dequantize_tree(adapted)
  got, g = _outputs_and_grads(apply, adapted, x)
  ref, gd = _outputs_and_grads(apply, dense, x)
  scale = float(jnp.abs(ref.astype(jnp.float32)).max())
  assert float(jnp.abs(got.astype(jnp.float32) - ref).max()) <= tol * scale
  # gradients with respect to A and B equal the reference's
  assert len(jax.tree.leaves(g)) == 4
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gd), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 5 * tol * np.abs(b).max()
  # and written out by hand for one layer: dequantize(W) x + b + s B A x
  p = adapted["params"]["dense_0"]
  a, b = p["lora_a"].astype(dtype), p["lora_b"].astype(dtype)
  h = x @ dequantize(p["kernel"]) + p["bias"] + 2.0 * (x @ a) @ b
  h_ours = lora_jax.lora_apply(nn.Dense(128, dtype=dtype).apply)({"params": p}, x)
  assert float(jnp.abs(h_ours - h).max()) <= tol * float(jnp.abs(h).max())


@pytest.mark.parametrize("scan", [True], ids=["scan"])  # unscanned modules: the MLP test above
def test_qlora_llama_matches_dense_reference(scan):
  cfg = config("llama-gqa-untied", num_hidden_layers=2)
  module, variables = from_config(cfg, scan_layers=scan, rng=0)
  ids = jnp.asarray(np.random.RandomState(0).randint(1, cfg.vocab_size, (2, 9)))
  layouts = lora_jax.kernel_layouts(module, ids)
  rule = lora_jax.LoraRule("all-linear", rank=4, alpha=8)
  adapted = _adapted(variables, rule, "nf4", layouts)
  q_proj = adapted["params"]["model"]["layers"]
  q_proj = (q_proj if scan else q_proj["0"])["self_attn"]["q_proj"]["kernel"]
  assert isinstance(q_proj, QuantizedArray) and q_proj.stacked == (1 if scan else 0)
  assert not isinstance(adapted["params"]["lm_head"]["kernel"], QuantizedArray)  # all-linear
  dense = qkernel.dequantize_tree(adapted)
  apply = lora_jax.lora_apply(module.apply)
  got, g = _outputs_and_grads(apply, adapted, ids)
  ref, gd = _outputs_and_grads(apply, dense, ids)
  assert float(jnp.abs(got - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())
  base = jax.jit(module.apply)(variables, ids)  # one program, not op by op
  assert float(jnp.abs(ref - base).max()) > 0.05  # adapters + NF4 act
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gd), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_dequantized_weights_are_not_kept_for_the_backward_pass():
  """Without remat, a scanned model keeps what its backward pass needs from every layer: the
  low-rank path must keep the codes, not each layer's dequantized weight."""
  cfg = config("llama-gqa-untied", hidden_size=256, intermediate_size=768, num_hidden_layers=8)
  module, _ = from_config(cfg, scan_layers=True, rng=0)
  ids1 = jnp.ones((1, 1), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids1)
  layouts = lora_jax.kernel_layouts(module, ids1)
  q = quantize(shapes, "all-linear", layouts=layouts)
  adapted = lora_jax.lora_init(q, lora_jax.LoraRule("all-linear", rank=2), rng=jax.random.key(0),
                               layouts=layouts)  # fmt: skip
  t, f = lora_jax.partition(adapted, lora_jax.trainable_mask(adapted))
  grad = jax.grad(_loss(lora_jax.lora_apply(module.apply), jnp.ones((1, 4), jnp.int32)))
  temp = jax.jit(grad).lower(t, f).compile().memory_analysis().temp_size_in_bytes
  layers = shapes["params"]["model"]["layers"]
  dense_bytes = sum(
    x.size * 4 for k, x in jax.tree_util.tree_leaves_with_path(layers) if "kernel" in str(k)
  )
  assert temp < dense_bytes / 2, (temp, dense_bytes)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_from_pretrained_quantizes_while_loading(scan, tmp_path):
  ckpt = save_checkpoint(config("llama-tied-bias-llama3"), tmp_path)
  spec = Quantization(["q_proj", "down_proj"], kind="nf4", block_size=32)
  module, streamed = from_pretrained(ckpt.folder, scan_layers=scan, quantize=spec)
  _, plain = from_pretrained(ckpt.folder, scan_layers=scan)
  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 1), jnp.int32))
  after = quantize(plain, spec.targets, block_size=32, layouts=layouts)
  assert jax.tree.structure(streamed) == jax.tree.structure(after)
  for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  kinds = [type(x).__name__ for x in jax.tree.leaves(streamed, is_leaf=qarray.is_quantized)]
  assert kinds.count("QuantizedArray") == (2 if scan else 2 * 3)
  with pytest.raises(ValueError, match="must be None or a lora_jax.Quantization"):
    from_pretrained(ckpt.folder, quantize="nf4")
  with pytest.raises(ValueError, match="quantize target 'qproj' matches no module"):
    from_pretrained(ckpt.folder, quantize=Quantization(["qproj"]))


def test_from_config_quantizes_and_scanned_layers_unstack_and_stack(tmp_path):
  """``from_config(quantize=)`` (a from-scratch QLoRA base) equals ``quantize`` after init;
  ``exclude`` keeps a module out; per-layer export and back (``unstack_layers`` /
  ``stack_layers``) slice and restack every stored array of a scanned kernel."""
  cfg = config("llama-gqa-untied", num_hidden_layers=3)
  spec = Quantization("all-linear", kind="nf4", exclude=["o_proj"])
  module, q = from_config(cfg, scan_layers=True, rng=0, quantize=spec)
  _, plain = from_config(cfg, scan_layers=True, rng=0)
  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 1), jnp.int32))
  after = quantize(plain, "all-linear", exclude=["o_proj"], layouts=layouts)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(after), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  attn = q["params"]["model"]["layers"]["self_attn"]
  assert isinstance(attn["q_proj"]["kernel"], QuantizedArray)
  assert not isinstance(attn["o_proj"]["kernel"], QuantizedArray)  # excluded
  per_layer = lora_jax.unstack_layers(q, "model/layers")
  one = per_layer["params"]["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(
    np.asarray(dequantize(one)), np.asarray(dequantize(attn["q_proj"]["kernel"]))[1]
  )
  again = lora_jax.stack_layers(per_layer, "model/layers")
  assert jax.tree.structure(again) == jax.tree.structure(q)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(q), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quantized_leaves_are_frozen_and_never_reach_grad():
  model = MLP()
  x = jnp.ones((2, 8))
  adapted = _adapted(model.init(jax.random.key(0), x), lora_jax.LoraRule(".*", rank=2), "nf4")
  # even a pattern over the whole module path leaves the quantized arrays frozen
  mask = lora_jax.trainable_mask(adapted, extra_trainable=["dense_0"])
  q_mask = mask["params"]["dense_0"]["kernel"]
  assert not any(jax.tree.leaves(q_mask)) and mask["params"]["dense_0"]["bias"]
  t, f = lora_jax.partition(adapted, mask)
  kernel_half = jax.tree.leaves(t["params"]["dense_0"]["kernel"], is_leaf=lambda y: y is None)
  assert all(x is None for x in kernel_half)
  tx = lora_jax.lora_optimizer(optax.adamw(1e-3), adapted, ["dense_0"])
  state = tx.init(t)
  grads = jax.jit(jax.grad(_loss(lora_jax.lora_apply(model.apply), x)))(t, f)
  updates, _ = tx.update(grads, state, t)
  new = lora_jax.combine(optax.apply_updates(t, updates), f)
  codes = new["params"]["dense_0"]["kernel"].codes
  assert codes.dtype == jnp.uint8 and (codes == adapted["params"]["dense_0"]["kernel"].codes).all()
  # and the optimizer on the full tree gives the quantized arrays no state
  full_state = tx.init(adapted)
  assert not any(getattr(x, "dtype", None) == jnp.uint8 for x in jax.tree.leaves(full_state))


def test_merge_export_and_report_dequantize(tmp_path):
  pytest.importorskip("torch")
  import safetensors.numpy

  from lora_jax.models import export_merged

  cfg = config("llama-gqa-untied")
  module, variables = from_config(cfg, rng=0)
  rule = lora_jax.LoraRule(["q_proj", "up_proj"], rank=2)
  adapted = _adapted(variables, rule, "nf4")
  merged = lora_jax.merge(adapted)
  leaves = jax.tree.leaves(merged, is_leaf=qarray.is_quantized)
  assert not any(isinstance(x, QuantizedArray) for x in leaves)
  up = adapted["params"]["model"]["layers"]["1"]["mlp"]["up_proj"]
  s_ab = (up["lora_a"] @ up["lora_b"]) * up["lora_spec"].scale
  a_up = np.asarray(dequantize(up["kernel"]) + s_ab)
  np.testing.assert_allclose(
    np.asarray(merged["params"]["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]), a_up,
    rtol=1e-6, atol=1e-6,
  )  # fmt: skip
  folder = export_merged(tmp_path / "out", adapted, config=cfg)
  state = safetensors.numpy.load_file(folder / "model.safetensors")
  np.testing.assert_allclose(state["model.layers.1.mlp.up_proj.weight"], a_up.T, atol=1e-6)
  report = lora_jax.param_report(adapted).splitlines()
  plain = lora_jax.param_report(lora_jax.lora_init(variables, rule, rng=jax.random.key(1)))
  plain = plain.splitlines()
  assert report[0] == plain[0]  # the same counts as the unquantized tree
  n_q = 3 * (64 * 64 + 64 * 96)
  stored = sum(
    x.nbytes
    for x in jax.tree.leaves(adapted, is_leaf=qarray.is_quantized)
    if qarray.is_quantized(x)
  )
  assert report[1].startswith(f"quantized params: {n_q:,} (nf4 block=64 dq) in {stored:,} bytes")
  assert any("kernel: nf4 block=64 dq" in line for line in report)


def test_refusals_name_the_path():
  x = jnp.ones((1, 2, 4, 8))
  heads = Heads(heads=4, head_dim=8, hidden=8)
  v = heads.init(jax.random.key(0), jnp.ones((1, 2, 8)))
  with pytest.raises(ValueError, match=r"params/mix/kernel of shape \(4, 8, 8\).*not supported"):
    quantize(v, ["mix"], layouts=lora_jax.kernel_layouts(heads, jnp.ones((1, 2, 8))))
  del x
  lm = TiedLM()
  v = lm.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="'params/embed'.*an embedding"):
    quantize(v, ["embed"])
  with pytest.raises(ValueError, match="quantize target 'hiden' matches no module"):
    quantize(v, ["hiden"])
  stacked = {"layers": {"proj": {"kernel": jnp.ones((3, 8, 8))}}}
  with pytest.raises(ValueError, match="pass layouts=lora_jax.kernel_layouts"):
    quantize(stacked, ["proj"])
  with pytest.raises(ValueError, match="block_size=48 is not one of"):
    quantize(v, ["hidden"], block_size=48)
  with pytest.raises(ValueError, match="already quantized"):
    quantize(quantize(v, ["hidden"]), ["hidden"])
  with pytest.raises(TypeError, match="dequantize takes a QuantizedArray"):
    dequantize(jnp.ones(3))


def test_plain_apply_of_a_quantized_kernel_fails_clearly():
  model = nn.Dense(16)
  x = jnp.ones((1, 16))
  q = quantize(model.init(jax.random.key(0), x), ".*", kind="int8")  # [16, 16]: shapes agree
  with pytest.raises(TypeError, match="lora_jax.lora_apply"):
    model.apply(q, x)
  np.testing.assert_allclose(
    lora_jax.lora_apply(model.apply)(q, x), model.apply(lora_jax.merge(q), x), rtol=1e-6
  )


def test_memory_bench_on_a_tiny_config():
  import sys

  sys.path.insert(0, str(REPO))
  from bench import qlora_memory

  tiny = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
  row = qlora_memory.qlora_memory(tiny, seq=16, rank=4)
  linear = 2 * (4 * 256 * 256 + 3 * 256 * 512)
  other = 2 * 256 * 256 + (2 * 2 + 1) * 256  # embeddings, head, norms
  assert row["params"] == linear + other
  assert row["base_bf16_bytes"] == 2 * (linear + other)
  per_value = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed codes, 8-bit absmax, absmax2
  assert row["base_nf4_dq_bytes"] == pytest.approx(linear * per_value + 2 * other, rel=1e-3)
  assert 0 < row["step_peak_bytes"] and row["trainable_params"] == 2 * 4 * (
    4 * (256 + 256) + 2 * (256 + 512) + (512 + 256)
  )
  saved = json.loads((REPO / "bench" / "results" / "qlora_memory.json").read_text())
  assert saved["base_ratio"] <= 0.30 and saved["step_peak_bytes"] < 8 * 1024**3


@pytest.mark.slow
def test_smollm2_nf4_perplexity_equals_bitsandbytes_nf4(smollm2_path):
  """Held-out perplexity of the untuned SmolLM2-135M-Instruct on the dates recipe's validation
  conversations, float32 against an NF4 (double quant) and an int8 all-linear base, against
  transformers with each linear weight passed through bitsandbytes' NF4 round trip."""
  torch = pytest.importorskip("torch")
  functional = pytest.importorskip("bitsandbytes.functional")
  transformers = pytest.importorskip("transformers")
  tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path)
  rows = (REPO / "configs" / "smollm2_dates" / "validation.jsonl").read_text().splitlines()
  texts = [tokenizer.apply_chat_template(json.loads(r)["messages"], tokenize=False) for r in rows]
  batch = tokenizer(texts[:16], padding=True, return_tensors="np")
  ids, mask = batch["input_ids"], batch["attention_mask"]
  module, variables = from_pretrained(smollm2_path, scan_layers=True)
  _, nf4 = from_pretrained(smollm2_path, scan_layers=True, quantize=Quantization("all-linear"))
  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 1), jnp.int32))
  int8 = quantize(variables, "all-linear", kind="int8", layouts=layouts)

  def perplexity(params):
    logits = lora_jax.lora_apply(module.apply)(params, ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return float(jnp.exp(-(tok * mask[:, 1:]).sum() / mask[:, 1:].sum()))

  ours = {k: perplexity(p) for k, p in [("float", variables), ("nf4", nf4), ("int8", int8)]}
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
  with torch.no_grad():
    for name, linear in model.named_modules():
      if isinstance(linear, torch.nn.Linear) and "lm_head" not in name:
        packed, state = functional.quantize_4bit(
          linear.weight.data, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        linear.weight.data = functional.dequantize_4bit(packed, state)
    logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, 1:, None])[..., 0]
    m = torch.tensor(mask)[:, 1:]
    bnb = float(torch.exp(-(logp * m).sum() / m.sum()))
  print(f"SmolLM2-135M-Instruct perplexity: {ours}, transformers + bitsandbytes NF4 {bnb:.4f}")
  assert abs(ours["nf4"] / bnb - 1) <= 0.01  # our NF4 is bitsandbytes' NF4
  assert abs(ours["int8"] / ours["float"] - 1) <= 0.05
  # NF4 costs this small model much more than 5% (bitsandbytes' own NF4 alike): see README
  assert ours["nf4"] > ours["float"]


def test_readme_names_the_qlora_section():
  assert "## QLoRA: a 4-bit frozen base" in pathlib.Path(REPO / "README.md").read_text()
