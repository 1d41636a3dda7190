"""models.generate: the same tokens as transformers, a cache that changes nothing, one program."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from llm import adapted
from llm import config
from llm import save_checkpoint

import lora_jax
from lora_jax.models import KVCache
from lora_jax.models import from_pretrained
from lora_jax.models import generate
from lora_jax.models.decoder.generate import decode_step

PROMPTS = [[5, 9, 22, 7, 31], [3, 44], [8, 1, 2, 3, 4, 5, 6, 7, 9, 10]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  # untied: with tied embeddings a random model mostly repeats its input token
  folder = tmp_path_factory.mktemp("gen")
  return save_checkpoint(config("qwen2-bias", vocab_size=211, tie_word_embeddings=False), folder)


def _transformers_greedy(model, prompts, max_new_tokens, eos=None):
  torch = pytest.importorskip("torch")
  out = []
  for p in prompts:
    ids = torch.tensor([p])
    g = model.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      do_sample=False,
      max_new_tokens=max_new_tokens,
      eos_token_id=eos,
      pad_token_id=0,
    )
    out.append(g[0, len(p) :].tolist())
  return out


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_greedy_tokens_equal_transformers(ckpt, scan):
  module, variables = from_pretrained(ckpt.folder, scan_layers=scan)
  ours = generate(module, variables, PROMPTS, max_new_tokens=12)
  theirs = _transformers_greedy(ckpt.torch_model, PROMPTS, 12)
  assert ours == theirs
  assert all(len(set(t)) > 3 for t in ours)  # a model that says something, not one token


def test_cached_decoding_gives_the_full_forward_logits(ckpt):
  """Prefill into the cache, then one token at a time: each step's logits equal those of the
  whole sequence run without a cache (left-padded rows, different lengths)."""
  module, variables = from_pretrained(ckpt.folder, scan_layers=True)
  rng = np.random.RandomState(0)
  lengths, bucket, new = (5, 2), 8, 4
  seqs = [rng.randint(1, 211, n + new) for n in lengths]
  ids = np.zeros((2, bucket), np.int32)
  valid = np.zeros((2, bucket + new), np.int32)
  full_ids = np.zeros((2, max(lengths) + new), np.int32)  # right-padded, no cache
  full_mask = np.zeros_like(full_ids)
  for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
    ids[i, bucket - n :], valid[i, bucket - n : bucket] = s[:n], 1
    full_ids[i, : n + new], full_mask[i, : n + new] = s, 1
  full = jax.jit(module.apply)(variables, full_ids, full_mask)
  cache = KVCache.zeros(module.config, 2, bucket + new)
  positions = np.maximum(np.cumsum(valid[:, :bucket], axis=1) - 1, 0)
  prefill = jax.jit(module.apply, static_argnames="cache_index")
  logits, cache = prefill(variables, ids, valid, positions, cache=cache, cache_index=0)
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(logits[i, -1], full[i, n - 1], atol=1e-5, rtol=1e-5)
  step = jax.jit(decode_step, static_argnums=0)
  for t in range(new - 1):
    valid[:, bucket + t] = 1
    token = np.array([s[n + t] for s, n in zip(seqs, lengths, strict=True)], np.int32)
    logits, cache = step(module, variables, token, np.array(lengths) + t, cache, valid, bucket + t)
    for i, n in enumerate(lengths):
      np.testing.assert_allclose(logits[i], full[i, n + t], atol=1e-5, rtol=1e-5)


def _max_traces(monkeypatch, n: int) -> None:
  """From here on, tracing the generation program more than ``n`` times fails (chex)."""
  from lora_jax.models.decoder import generate as generation

  fn = chex.assert_max_traces(generation._generate.__wrapped__, n=n)
  jitted = jax.jit(fn, static_argnames=("module", "max_new_tokens"))
  monkeypatch.setattr(generation, "_generate", jitted)


def test_prompts_in_one_bucket_share_one_program(ckpt, monkeypatch):
  module, variables = from_pretrained(ckpt.folder, scan_layers=True)
  _max_traces(monkeypatch, n=2)  # bucket 8 once, bucket 16 once
  generate(module, variables, [[1, 2, 3], [4, 5]], max_new_tokens=5)
  for prompts in ([[7, 8, 9, 10, 11, 12], [13]], [[14, 15], [16, 17, 18, 19, 20, 21, 22]]):
    generate(module, variables, prompts, max_new_tokens=5)  # same batch, bucket and settings
  generate(module, variables, [[1] * 9, [2]], max_new_tokens=5)  # bucket 16
  with pytest.raises(AssertionError, match="traced > 2 times"):
    generate(module, variables, [[1] * 17, [2]], max_new_tokens=5)  # bucket 32: a third trace


def test_generation_ends_at_the_first_eos(ckpt):
  module, variables = from_pretrained(ckpt.folder, scan_layers=True)
  free = generate(module, variables, PROMPTS, max_new_tokens=8)
  eos = free[0][2]  # the third token of the first prompt's answer
  ended = generate(module, variables, PROMPTS, max_new_tokens=8, eos_token_id=[999, eos])
  for tokens, full in zip(ended, free, strict=True):
    cut = full.index(eos) + 1 if eos in full else len(full)
    assert tokens == full[:cut]
  assert ended[0] == free[0][: free[0].index(eos) + 1] and len(ended[0]) <= 3
  theirs = _transformers_greedy(ckpt.torch_model, PROMPTS[:1], 8, eos=eos)
  assert ended[0] == theirs[0]


def test_sampling_settings(ckpt, monkeypatch):
  module, variables = from_pretrained(ckpt.folder, scan_layers=True)
  _max_traces(monkeypatch, n=2)  # greedy once, and one program for every sampling setting
  greedy = generate(module, variables, PROMPTS, max_new_tokens=6)
  key = jax.random.key(7)
  kw = dict(max_new_tokens=6, rng=key)
  assert generate(module, variables, PROMPTS, temperature=1.0, top_k=1, **kw) == greedy
  assert generate(module, variables, PROMPTS, temperature=1.0, top_p=1e-6, **kw) == greedy
  hot = generate(module, variables, PROMPTS, temperature=5.0, **kw)
  assert hot == generate(module, variables, PROMPTS, temperature=5.0, **kw)  # same key
  assert hot != greedy
  assert hot != generate(module, variables, PROMPTS, temperature=5.0, max_new_tokens=6,
                         rng=jax.random.key(8))  # fmt: skip


def test_sample_token_keeps_only_top_k_and_top_p():
  from lora_jax.models.decoder.generate import sample_token

  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)

  def seen(top_k, top_p):
    return set(np.asarray(jax.vmap(lambda k: sample_token(logits, k, 1.0, top_k, top_p)[0])(keys)))

  assert seen(0, 1.0) == {0, 1, 2, 3}
  assert seen(2, 1.0) == {0, 1}
  assert seen(0, 0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
  assert seen(0, 0.81) == {0, 1, 2}


def test_bad_arguments_are_named(ckpt):
  module, variables = from_pretrained(ckpt.folder)
  cases = [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\]=\[\] is not a non-empty list of int"),
    (dict(prompts=["hello"]), r"prompts\[0\]='hello'"),
    (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive int"),
    (dict(temperature=0.7), "temperature=0.7 samples tokens: pass rng="),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k=-1 must be an int >= 0"),
    (dict(prompts=[[5, 9], [5, 211]]), r"prompts\[1\] holds token id 211, outside .* of 211"),
    (dict(prompts=[[-5, 9]]), r"prompts\[0\] holds token id -5, outside .* \(ids 0\.\.210\)"),
  ]
  for kw, message in cases:
    kw = {"prompts": PROMPTS, "max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=message):
      generate(module, variables, kw.pop("prompts"), **kw)
  encoder = lora_jax.models.auto_model(
    transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=16)
  )  # fmt: skip
  with pytest.raises(ValueError, match="needs a lora_jax.models.Decoder with task='causal-lm'"):
    generate(encoder, {}, PROMPTS, max_new_tokens=4)


# ---------------------------------------------------------------------------------------------
# With adapters.


def test_adapters_take_effect_and_match_merged_weights_and_peft(ckpt, tmp_path):
  import peft

  module, variables = from_pretrained(ckpt.folder, scan_layers=True)
  rule = lora_jax.LoraRule(["q_proj", "v_proj", "down_proj"], rank=4, alpha=8)
  params = adapted(module, variables, rule, seed=3, scale=0.2)
  base = generate(module, variables, PROMPTS, max_new_tokens=10)
  tuned = generate(module, params, PROMPTS, max_new_tokens=10)
  assert tuned != base
  assert generate(module, lora_jax.merge(params), PROMPTS, max_new_tokens=10) == tuned
  lora_jax.export_peft(
    tmp_path, params, base_model_name_or_path=str(ckpt.folder), config=ckpt.config,
    task_type="CAUSAL_LM",
  )  # fmt: skip
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.folder).eval()
  peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path).eval()
  assert _transformers_greedy(peft_model, PROMPTS, 10) == tuned


# ---------------------------------------------------------------------------------------------
# Cost of a decode step.


def _flops(fn, *args) -> float:
  cost = jax.jit(fn, static_argnums=0).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost["flops"])


def test_decode_step_reads_each_weight_once():
  """A decode step's compiled FLOPs are ``2 N`` per row (each matmul weight used once) plus
  attention over the cache, and an adapter adds only its own ``2 r (in + out)``: no merged or
  otherwise weight-sized work."""
  cfg = transformers.LlamaConfig(
    vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
  )  # fmt: skip
  # unscanned: XLA's cost analysis counts a while loop's body once, not once per layer
  module, variables = lora_jax.models.from_config(cfg)
  batch, slots, heads, dim = 4, 64, 8, 32
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(variables) if "kernel" in str(p)]
  matmul = sum(x.size for x in kernels) + cfg.vocab_size * cfg.hidden_size  # tied head
  attention = 4 * slots * heads * dim * cfg.num_hidden_layers
  args = (
    jnp.ones((batch,), jnp.int32),
    jnp.full((batch,), 10, jnp.int32),
    KVCache.zeros(module.config, batch, slots),
    jnp.ones((batch, slots), jnp.int32),
    jnp.int32(10),
  )
  base = _flops(decode_step, module, variables, *args)
  model = batch * (2 * matmul + attention)
  assert 0.95 * model <= base <= 1.15 * model, (base, model)

  layouts = lora_jax.kernel_layouts(module, jnp.ones((1, 2), jnp.int32))
  rule = lora_jax.LoraRule("all-linear", rank=8)
  params = lora_jax.lora_init(variables, rule, rng=jax.random.key(0), layouts=layouts)
  adapter = sum(2 * 8 * (k.shape[0] + k.shape[1]) for k in kernels)
  with_adapters = _flops(decode_step, module, params, *args)
  assert with_adapters <= 1.15 * (model + batch * adapter), (with_adapters, model, adapter)
