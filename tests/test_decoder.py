"""Llama-family decoders: parity with transformers, scanned layers, packed rows, loading."""

from __future__ import annotations

import copy
import json
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util
from llm import FAMILIES
from llm import adapted
from llm import config
from llm import max_error
from llm import mixed_batch
from llm import randomize_adapters
from llm import save_checkpoint
from llm import torch_logits

import lora_jax
from lora_jax.models import DecoderConfig
from lora_jax.models import auto_model
from lora_jax.models import from_pretrained
from lora_jax.models.layers import rope


@pytest.fixture(scope="module")
def ckpt(request, tmp_path_factory):
  return save_checkpoint(config(request.param), tmp_path_factory.mktemp(request.param))


# every family unscanned; two of them scanned too (scanned = unscanned has its own test below)
PARITY = [(name, False) for name in sorted(FAMILIES)]
PARITY += [("llama-tied-bias-llama3", True), ("qwen3-qknorm", True)]


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
  return save_checkpoint(config("llama-tied-bias-llama3"), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def calm_ckpt(tmp_path_factory):
  """Smaller weights: float32 rounding stays near 1e-7, so 1e-5 comparisons of gradients test
  the computation, not the conditioning of a model with logits of 30."""
  folder = tmp_path_factory.mktemp("calm")
  return save_checkpoint(config("llama-tied-bias-llama3"), folder, gain=0.5)


# ---------------------------------------------------------------------------------------------
# Parity with transformers.


@pytest.mark.parametrize("ckpt,scan", PARITY, indirect=["ckpt"])
def test_parity_with_transformers_on_padded_mixed_lengths(ckpt, scan):
  module, variables = from_pretrained(ckpt.folder, "causal-lm", scan_layers=scan)
  ids, mask = mixed_batch(ckpt.config)
  logits = jax.jit(module.apply)(variables, ids, mask)
  assert logits.shape == (3, 9, ckpt.config.vocab_size) and logits.dtype == jnp.float32
  ref = torch_logits(ckpt.torch_model, ids, mask)
  assert np.abs(ref).max() > 1.0  # logits large enough for the tolerance to mean something
  assert max_error(logits, ref, mask) <= 1e-4


def test_left_padding_gives_each_sequence_its_own_logits(llama_ckpt):
  module, variables = from_pretrained(llama_ckpt.folder)
  left_ids, left_mask = mixed_batch(llama_ckpt.config, side="left")
  logits = np.asarray(jax.jit(module.apply)(variables, left_ids, left_mask))
  # transformers' forward counts positions from the row start; its generate passes these:
  positions = np.maximum(np.cumsum(left_mask, axis=1) - 1, 0)
  ref = torch_logits(llama_ckpt.torch_model, left_ids, left_mask, positions)
  assert max_error(logits, ref, left_mask) <= 1e-4
  right_ids, right_mask = mixed_batch(llama_ckpt.config, side="right")
  right = np.asarray(jax.jit(module.apply)(variables, right_ids, right_mask))
  np.testing.assert_allclose(logits[left_mask == 1], right[right_mask == 1], atol=1e-5)


def test_sliding_window_changes_what_long_rows_see(tmp_path):
  windowed = save_checkpoint(config("mistral-window"), tmp_path)
  module, variables = from_pretrained(windowed.folder)
  ids, mask = mixed_batch(windowed.config)
  ours = np.asarray(module.apply(variables, ids, mask))
  full = auto_model(config("mistral-window", sliding_window=None))
  no_window = np.asarray(full.apply(variables, ids, mask))
  assert np.abs(ours[0, 3:] - no_window[0, 3:]).max() > 1e-2  # keys 3+ back are cut off
  np.testing.assert_allclose(ours[:, :3], no_window[:, :3], atol=1e-6)  # not yet for these


def test_bfloat16_is_as_accurate_as_transformers_bfloat16(llama_ckpt):
  torch = pytest.importorskip("torch")
  """bf16 keeps 8 significant bits, so every matmul, norm and residual add rounds at about
  2^-9 relative; the honest bar for our bf16 forward is transformers' own bf16 forward of the
  same weights, both measured against float32: ours may be at most 1.5x its error (+0.02)."""
  ids, mask = mixed_batch(llama_ckpt.config)
  ref = torch_logits(llama_ckpt.torch_model, ids, mask)
  torch_bf16 = torch_logits(copy.deepcopy(llama_ckpt.torch_model).to(torch.bfloat16), ids, mask)
  module, variables = from_pretrained(
    llama_ckpt.folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
  )
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  ours = jax.jit(module.apply)(variables, ids, mask)
  theirs = max_error(torch_bf16, ref, mask)
  assert 1e-3 < theirs < 1.0  # bf16 visibly rounds, and the model is not degenerate
  assert max_error(ours, ref, mask) <= 1.5 * theirs + 0.02


# ---------------------------------------------------------------------------------------------
# Configs.


def test_rope_settings_read_from_both_config_spellings():
  old = {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
  new = {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
  assert rope.rope_settings(old) == rope.rope_settings(new) == rope.Rope(5e5, "linear", 2.0)
  assert rope.rope_settings({}) == rope.Rope(10000.0)
  tf_config = config("llama-tied-bias-llama3")  # transformers 5 writes rope_parameters
  assert DecoderConfig.from_hf(tf_config).rope == rope.Rope(5e5, "llama3", 8.0, 1.0, 4.0, 16)


@pytest.mark.parametrize("name", ["llama-tied-bias-llama3", "llama-linear-rope", "qwen2-bias"])
def test_inverse_frequencies_match_transformers(name):
  pytest.importorskip("torch")  # transformers computes its frequencies in torch
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  cfg = config(name)
  ours = rope.inverse_frequencies(DecoderConfig.from_hf(cfg).rope, 16)
  rope_type = cfg.rope_parameters["rope_type"]
  init = ROPE_INIT_FUNCTIONS.get(rope_type)
  if init is None:  # "default" lives on the model's rotary embedding class
    init = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding
    init = init.compute_default_rope_parameters
  theirs, scaling = init(cfg)
  assert scaling == 1.0
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
  if rope_type != "default":
    plain = rope.Rope(cfg.rope_parameters["rope_theta"])
    assert not np.allclose(ours, rope.inverse_frequencies(plain, 16))


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic", "longrope"])
def test_other_rope_types_are_refused_by_name(rope_type):
  cfg = {"model_type": "llama", "rope_scaling": {"rope_type": rope_type, "factor": 2.0}}
  with pytest.raises(ValueError, match=f"unsupported RoPE type '{rope_type}'.*default, linear"):
    rope.rope_settings(cfg)


def test_unsupported_decoder_settings_are_named():
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, mistral"):
    auto_model(transformers.GPT2Config())
  with pytest.raises(ValueError, match="unknown task 'sequence-classification' for a decoder"):
    auto_model(config("qwen2-bias"), "sequence-classification")
  with pytest.raises(ValueError, match="unsupported hidden_act 'swish2'"):
    auto_model(config("qwen2-bias", hidden_act="swish2"))
  with pytest.raises(ValueError, match="scan_layers=True is not supported for 'bert'"):
    auto_model(transformers.BertConfig(), scan_layers=True)
  with pytest.raises(ValueError, match="num_labels=3 is for sequence-classification encoders"):
    lora_jax.models.from_config(config("qwen2-bias"), num_labels=3)


def test_family_fields_follow_the_config():
  fields = {
    name: DecoderConfig.from_hf(config(name))
    for name in ("qwen2-bias", "qwen3-qknorm", "mistral-window", "llama-tied-bias-llama3")
  }
  assert (fields["qwen2-bias"].qkv_bias, fields["qwen2-bias"].o_bias) == (True, False)
  assert fields["qwen3-qknorm"].qk_norm and fields["qwen3-qknorm"].head_dim == 24
  assert fields["mistral-window"].sliding_windows == (3, 3, 3)
  llama = fields["llama-tied-bias-llama3"]
  assert (llama.qkv_bias, llama.o_bias, llama.mlp_bias, llama.tie_word_embeddings) == (True,) * 4


# ---------------------------------------------------------------------------------------------
# Scanned layers and packed rows: the same numbers as the plain model.


def _loss_and_grads(module, params, ids, mask, **kw):
  apply = lora_jax.lora_apply(module.apply)
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params))

  def loss(t):
    logits = apply(lora_jax.combine(t, frozen), ids, mask, **kw)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    weight = jnp.asarray(mask)[:, 1:]
    return (nll * weight).sum() / weight.sum()

  return jax.jit(jax.value_and_grad(loss))(trainable)


def _adapted(module, variables, scale):
  return adapted(module, variables, lora_jax.LoraRule("all-linear", rank=4, alpha=8), 1, scale)


def test_scanned_and_unscanned_give_the_same_loss_and_gradients(calm_ckpt):
  ids, mask = mixed_batch(calm_ckpt.config)
  loop, loop_vars = from_pretrained(calm_ckpt.folder)
  loop_params = _adapted(loop, loop_vars, scale=0.05)
  loss, grads = _loss_and_grads(loop, loop_params, ids, mask)
  stacked = lora_jax.stack_layers(loop_params, "model/layers")
  scan = auto_model(calm_ckpt.config, scan_layers=True, remat=True)  # remat changes no number
  scan_loss, scan_grads = _loss_and_grads(scan, stacked, ids, mask)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  per_layer = lora_jax.unstack_layers(scan_grads, "model/layers")
  flat = traverse_util.flatten_dict(grads["params"], sep="/")
  for path, g in traverse_util.flatten_dict(per_layer["params"], sep="/").items():
    if hasattr(g, "shape"):
      np.testing.assert_allclose(g, flat[path], atol=1e-5, rtol=1e-5, err_msg=path)
  assert sum(hasattr(g, "shape") for g in flat.values()) == 3 * 7 * 2  # every adapter


def test_stacked_adapters_match_per_layer_adapters_in_the_forward(calm_ckpt):
  loop = auto_model(calm_ckpt.config)
  scan, scan_vars = from_pretrained(calm_ckpt.folder, scan_layers=True)
  scan_params = _adapted(scan, scan_vars, scale=0.1)
  spec = scan_params["params"]["model"]["layers"]["self_attn"]["q_proj"]["lora_spec"]
  a = scan_params["params"]["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
  assert spec.stacked == 1 and a.shape == (3, 64, 4)
  ids, mask = mixed_batch(calm_ckpt.config)
  scanned = jax.jit(lora_jax.lora_apply(scan.apply))
  ours = scanned(scan_params, ids, mask)
  fresh = randomize_adapters(scan_params, seed=0, scale=0.0)  # B = 0: the base model's logits
  assert max_error(ours, scanned(fresh, ids, mask), mask) > 0.1  # the adapters matter
  per_layer = lora_jax.unstack_layers(scan_params, "model/layers")
  ref = jax.jit(lora_jax.lora_apply(loop.apply))(per_layer, ids, mask)
  assert max_error(ours, ref, mask) <= 1e-5
  # merging stacked adapters merges each layer's own (a batched matmul over the stack may round
  # differently from one per layer: 1 ulp on this CPU; another layer's update would be 1e-2 off)
  merged = lora_jax.unstack_layers(lora_jax.merge(scan_params), "model/layers")
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(lora_jax.merge(per_layer)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_packed_rows_give_each_sequence_its_padded_logits_and_gradients(calm_ckpt):
  cfg = calm_ckpt.config
  module, variables = from_pretrained(calm_ckpt.folder, scan_layers=True)
  params = _adapted(module, variables, scale=0.05)
  rng = np.random.RandomState(3)
  seqs = [rng.randint(1, cfg.vocab_size, n) for n in (4, 3, 5, 2)]
  # padded: one sequence per row; packed: two rows of 8 tokens holding all four
  padded = np.zeros((4, 5), np.int64)
  padded_mask = np.zeros((4, 5), np.int64)
  for i, s in enumerate(seqs):
    padded[i, : len(s)], padded_mask[i, : len(s)] = s, 1
  packed = np.zeros((2, 8), np.int64)
  segments = np.zeros((2, 8), np.int64)
  layout = [(0, 0, 1), (0, 4, 2), (1, 0, 1), (1, 5, 2)]  # (row, start, segment) per sequence
  for s, (row, start, seg) in zip(seqs, layout, strict=True):
    packed[row, start : start + len(s)], segments[row, start : start + len(s)] = s, seg

  def targets(ids, segs):  # next-token targets within one sequence
    return (segs[:, 1:] == segs[:, :-1]) & (segs[:, 1:] > 0)

  (seg_loss, ours), seg_grads = _packed_loss(module, params, packed, segments, targets)
  (pad_loss, ref), pad_grads = _packed_loss(module, params, padded, padded_mask, targets)
  for i, (s, (row, start, _)) in enumerate(zip(seqs, layout, strict=True)):
    np.testing.assert_allclose(ours[row, start : start + len(s)], ref[i, : len(s)], atol=1e-5)
  np.testing.assert_allclose(seg_loss, pad_loss, rtol=1e-5)
  for g, h in zip(jax.tree.leaves(seg_grads), jax.tree.leaves(pad_grads), strict=True):
    np.testing.assert_allclose(g, h, atol=1e-5)


def _packed_loss(module, params, ids, segs, targets):
  """(loss, logits) and gradients; rows with one sequence each are run without segment_ids."""
  apply = lora_jax.lora_apply(module.apply)
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params))
  kw = {"segment_ids": segs} if segs.max() > 1 else {}
  weight = targets(ids, segs)

  def loss(t):
    logits = apply(lora_jax.combine(t, frozen), ids, segs > 0, **kw)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
    return (nll * weight).sum() / weight.sum(), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)


# ---------------------------------------------------------------------------------------------
# Loading.


def test_bfloat16_and_sharded_checkpoints_load(llama_ckpt, tmp_path):
  torch = pytest.importorskip("torch")
  model = copy.deepcopy(llama_ckpt.torch_model)
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="100KB")
  model = copy.deepcopy(llama_ckpt.torch_model)  # the bf16-rounded weights, in float32
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.bfloat16().float())
  index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) >= 3
  module, variables = from_pretrained(tmp_path / "bf16", scan_layers=True)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  ids, mask = mixed_batch(llama_ckpt.config)
  ref = torch_logits(model, ids, mask)
  assert max_error(jax.jit(module.apply)(variables, ids, mask), ref, mask) <= 1e-4


def test_loading_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
  """Each checkpoint tensor is read from disk while the device array it belongs to is built,
  and building that array costs the host no more than its own bytes: the checkpoint is never
  read whole first, nor held twice (per-layer copies of a stacked leaf included)."""
  from lora_jax.models.hf import checkpoint as files

  cfg = transformers.LlamaConfig(
    vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
  )  # fmt: skip
  save_checkpoint(cfg, tmp_path)
  events, costs = [], []
  view, make = files.LazyTensor.view, jax.make_array_from_callback

  def recorded_view(self):
    events.append("read")
    return view(self)

  def measured_make(shape, sharding, callback):
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    events.append("start")
    out = make(shape, sharding, callback)
    events.append("end")
    costs.append((tracemalloc.get_traced_memory()[1] - before, out.nbytes))
    return out

  monkeypatch.setattr(files.LazyTensor, "view", recorded_view)
  monkeypatch.setattr(jax, "make_array_from_callback", measured_make)
  for scan in (False, True):
    events.clear(), costs.clear()
    tracemalloc.start()
    try:
      from_pretrained(tmp_path, scan_layers=scan)
    finally:
      tracemalloc.stop()
    inside = 0
    for event in events:
      inside += {"start": 1, "end": -1}.get(event, 0)
      assert event != "read" or inside == 1, "a tensor was read outside its parameter's build"
    assert events.count("read") >= 4 * 7 + 3 and len(costs) == (4 * 9 + 3 if not scan else 12)
    for cost, nbytes in costs:
      assert cost <= 1.05 * nbytes + 65536, (scan, cost, nbytes)


def test_loading_straight_into_a_sharding(llama_ckpt):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def shard(path, shape):
    if path.endswith("/kernel") and shape[-1] % 8 == 0:
      spec = jax.sharding.PartitionSpec(*([None] * (len(shape) - 1)), "fsdp")
      return jax.sharding.NamedSharding(mesh, spec)
    return replicated

  module, sharded = from_pretrained(llama_ckpt.folder, scan_layers=True, sharding=shard)
  _, plain = from_pretrained(llama_ckpt.folder, scan_layers=True)
  q = sharded["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
  assert q.addressable_shards[0].data.shape == (3, 64, 8)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids, mask = mixed_batch(llama_ckpt.config)
  np.testing.assert_allclose(
    jax.jit(module.apply)(sharded, ids, mask), module.apply(plain, ids, mask), atol=1e-5, rtol=1e-5
  )


def test_missing_and_misshapen_tensors_are_listed_together(llama_ckpt, tmp_path):
  from safetensors.numpy import save_file

  state = {k: v.numpy() for k, v in llama_ckpt.torch_model.state_dict().items()}
  del state["model.layers.1.mlp.up_proj.weight"], state["model.norm.weight"]
  state["model.layers.2.self_attn.k_proj.weight"] = np.zeros((5, 64), np.float32)
  llama_ckpt.config.save_pretrained(tmp_path)
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="3 mismatch") as info:
    from_pretrained(tmp_path, scan_layers=True)
  message = str(info.value)
  assert (
    "model.layers.1.mlp.up_proj.weight (model/layers/1/mlp/up_proj/kernel): expected" in message
  )
  assert "model.norm.weight (model/norm/scale): expected (64,), missing" in message
  assert (
    "model.layers.2.self_attn.k_proj.weight (model/layers/2/self_attn/k_proj/kernel): "
    "expected (32, 64), got (5, 64)" in message
  )
