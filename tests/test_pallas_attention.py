"""attention_implementation="pallas": Pallas's fused kernels from segment ids (Triton on GPUs,
Mosaic on TPUs), causal (decoders) or bidirectional (encoders) within each packed sequence,
checked against XLA's attention with the dense mask. On CPU the kernels run interpreted by JAX
(the same kernel code); on a GPU the compiled Triton kernel is checked too; both lower for their
accelerator from this CPU (jax.export)."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from jax.experimental.pallas import tpu as pltpu

import lora_jax
from lora_jax.models import auto_model
from lora_jax.models import generate
from lora_jax.models.layers.attention import attention
from lora_jax.models.layers.attention import check_implementation
from lora_jax.models.layers.pallas_attention import padded_length
from lora_jax.models.layers.pallas_attention import segment_attention
from lora_jax.models.layers.pallas_attention import tpu_segment_attention

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"
MODES = [True, False] if ON_GPU else [True]  # interpret, and compiled where Triton exists


def tpu_kernel_mode():
  """The TPU kernel compiled by Mosaic on a TPU (bench/device_check.sh), interpreted by JAX on
  any other backend."""
  return contextlib.nullcontext() if ON_TPU else pltpu.force_tpu_interpret_mode()


# interpreted: XLA's float32 dots; compiled: Triton multiplies float32 in TF32 (10-bit mantissa)
TOL = {(jnp.float32, True): 2e-5, (jnp.float32, False): 3e-3, (jnp.bfloat16, True): 3e-2,
       (jnp.bfloat16, False): 3e-2}  # fmt: skip


def _reference(q, k, v, segment_ids, causal=True):
  seq = q.shape[1]
  mask = segment_ids[:, :, None] == segment_ids[:, None, :]
  if causal:
    mask &= jnp.tril(jnp.ones((seq, seq), bool))
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def _inputs(seq, heads, kv_heads, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (2, seq, heads, 16), dtype)
  k = jax.random.normal(keys[1], (2, seq, kv_heads, 16), dtype)
  v = jax.random.normal(keys[2], (2, seq, kv_heads, 16), dtype)
  cut = seq // 3
  row0 = [1] * cut + [2] * (seq - cut - 5) + [0] * 5  # two sequences, then padding
  row1 = [1] * seq  # one sequence
  return q, k, v, jnp.array([row0, row1], jnp.int32)


# Diagonal cases of the dtype x length x causality grid: one block and several blocks each run
# once, and so do float32 (the tight tolerance, on the several blocks) and bfloat16, causal
# (decoders) and bidirectional (encoders).
DIAGONAL = pytest.mark.parametrize(
  ("dtype", "seq", "causal"),
  [(jnp.float32, 160, True), (jnp.bfloat16, 40, True), (jnp.float32, 160, False)],
  ids=["float32-160", "bfloat16-40", "float32-160-bidirectional"],
)


@pytest.mark.parametrize("interpret", MODES)
@DIAGONAL  # 40 is padded to 64, 160 to 256 (past one 128-query block)
def test_values_and_gradients_equal_xla_with_the_dense_mask(seq, dtype, causal, interpret):
  q, k, v, seg = _inputs(seq, heads=4, kv_heads=2, dtype=dtype)
  kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
  kernel = functools.partial(segment_attention, causal=causal, interpret=interpret)
  # jitted: an interpreted kernel compiles into one program instead of running op by op
  got = jax.jit(kernel)(q, k, v, seg)
  want = _reference(q, kr, vr, seg, causal)
  tol = TOL[dtype, interpret]
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol, rtol=tol)
  cot = jax.random.normal(jax.random.key(9), got.shape, jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

  def fused(q, k, v):
    return kernel(q, k, v, seg)

  def dense(q, k, v):
    return _reference(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), seg, causal)

  grads = jax.jit(jax.grad(functools.partial(loss, fused), argnums=(0, 1, 2)))(q, k, v)
  ref = jax.grad(functools.partial(loss, dense), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, ref, strict=True):
    r = np.float32(r)
    np.testing.assert_allclose(np.float32(g), r, atol=tol * np.abs(r).max(), err_msg=name)


def test_padded_lengths_are_what_triton_compiles():
  """Each block the kernel uses (``min(block, length)``: 128 forward, 32 backward) is a power of
  two and divides the length; the padding stays under one forward block."""
  for seq in range(1, 600):
    n = padded_length(seq)
    assert seq <= n < seq + 128, seq
    for block in (128, 32):
      b = min(block, n)
      assert b & (b - 1) == 0 and n % b == 0, (seq, n)


def _config(**kw):
  return transformers.LlamaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, **kw,
  )  # fmt: skip


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_decoder_logits_equal_xla_packed_and_padded(scan):
  cfg = _config()
  ids = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)
  xla = auto_model(cfg, attention_implementation="xla", scan_layers=scan)
  fused = auto_model(cfg, attention_implementation="pallas_interpret", scan_layers=scan)
  variables = xla.init(jax.random.key(0), ids[:, :4])
  segments = jnp.array([[1] * 17 + [2] * 20 + [0] * 3, [1] * 40])
  real = np.asarray(segments) > 0
  got = fused.apply(variables, ids, segment_ids=segments)
  want = xla.apply(variables, ids, segment_ids=segments)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
  # padded rows (right and left): the attention mask as segment ids
  mask = jnp.array([[1] * 33 + [0] * 7, [0] * 6 + [1] * 34])
  real = np.asarray(mask) > 0
  got = fused.apply(variables, ids, attention_mask=mask)
  want = xla.apply(variables, ids, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
  # both: an attention mask that hides tokens inside a segment, and ids that are not above 0
  mask = jnp.array([[1] * 10 + [0] * 4 + [1] * 26, [1] * 40])
  segments = jnp.array([[1] * 20 + [2] * 20, [3] * 15 + [-1] * 5 + [3] * 20])
  real = (np.asarray(mask) > 0) & (np.asarray(segments) > 0)
  got = fused.apply(variables, ids, attention_mask=mask, segment_ids=segments)
  want = xla.apply(variables, ids, attention_mask=mask, segment_ids=segments)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)


def test_generation_with_a_cache_runs_xla_attention():
  """Every generate call has a cache, which the kernel does not take: XLA's attention runs."""
  cfg = _config()
  xla = auto_model(cfg, attention_implementation="xla")
  fused = auto_model(cfg, attention_implementation="pallas_interpret")
  variables = xla.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  prompts = [[3, 5, 7, 9, 11], [2, 4]]
  want = generate(xla, variables, prompts, max_new_tokens=4)
  assert generate(fused, variables, prompts, max_new_tokens=4) == want


@pytest.mark.skipif(ON_GPU or ON_TPU, reason="on an accelerator 'pallas' is its kernel (above)")
def test_pallas_off_a_gpu_or_tpu_is_xlas_attention():
  """ "pallas" is chosen per platform when the program is lowered: on this CPU, XLA's attention
  with the dense mask, the same numbers as "xla"."""
  cfg = _config()
  ids = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)
  xla = auto_model(cfg, attention_implementation="xla")
  variables = xla.init(jax.random.key(0), ids[:, :4])
  segments = jnp.array([[1] * 17 + [2] * 20 + [0] * 3, [1] * 40])
  got = auto_model(cfg, attention_implementation="pallas").apply(
    variables, ids, segment_ids=segments
  )
  want = xla.apply(variables, ids, segment_ids=segments)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The TPU kernel (Mosaic), interpreted on this CPU.

# interpreted: XLA's float32 dots; compiled on a TPU: float32 matmuls in bf16 passes (TPU's
# default precision), a guess until a TPU is lent
TPU_TOL = {jnp.float32: 2e-2 if ON_TPU else 2e-5, jnp.bfloat16: 3e-2}


@DIAGONAL  # 40 is padded to 128, 160 to 256 (past one block)
def test_tpu_kernel_values_and_gradients_equal_xla_with_the_dense_mask(seq, dtype, causal):
  q, k, v, seg = _inputs(seq, heads=4, kv_heads=2, dtype=dtype)
  cot = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

  def fused(q, k, v):
    return tpu_segment_attention(q, k, v, seg, causal=causal)

  def dense(q, k, v):
    return _reference(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), seg, causal)

  tol = TPU_TOL[dtype]
  with tpu_kernel_mode():  # jitted: one program, not the kernel op by op
    got = jax.jit(fused)(q, k, v)
    grads = jax.jit(jax.grad(functools.partial(loss, fused), argnums=(0, 1, 2)))(q, k, v)
  want = dense(q, k, v)
  np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol, rtol=tol)
  ref = jax.grad(functools.partial(loss, dense), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, ref, strict=True):
    r = np.float32(r)
    np.testing.assert_allclose(np.float32(g), r, atol=tol * np.abs(r).max(), err_msg=name)


def test_decoder_logits_with_the_tpu_kernel_equal_xla(monkeypatch):
  """The decoder's wiring into the TPU kernel (packed rows, GQA), the kernel chosen for this
  CPU in place of XLA's attention and interpreted."""
  from lora_jax.models.layers import attention as attention_lib

  tpu = attention_lib.FUSED_SEGMENT_KERNELS["tpu"]
  monkeypatch.setitem(attention_lib.FUSED_SEGMENT_KERNELS, "default", tpu)
  cfg = _config()
  ids = jax.random.randint(jax.random.key(1), (2, 40), 0, 64)
  xla = auto_model(cfg, attention_implementation="xla", scan_layers=True)
  fused = auto_model(cfg, attention_implementation="pallas", scan_layers=True)
  variables = xla.init(jax.random.key(0), ids[:, :4])
  segments = jnp.array([[1] * 17 + [2] * 20 + [0] * 3, [1] * 40])
  real = np.asarray(segments) > 0
  with tpu_kernel_mode():
    got = fused.apply(variables, ids, segment_ids=segments)
  want = xla.apply(variables, ids, segment_ids=segments)
  tol = TPU_TOL[jnp.float32]
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=tol)


# ---------------------------------------------------------------------------------------------
# Encoders: bidirectional within each packed sequence.


def _encoder_config(**kw):
  return transformers.RobertaConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=64, **kw,
  )  # fmt: skip


@pytest.mark.parametrize("kernel", ["triton", "tpu"])
def test_encoder_outputs_equal_xla_packed_and_padded(kernel, monkeypatch):
  """A RoBERTa encoder with the fused kernel (Triton's interpreted, or the TPU kernel chosen for
  this CPU and interpreted): packed rows (GLUE's --pack_sequences) and padded rows give XLA's
  hidden states at every real token, and the packed classifier XLA's logits."""
  from lora_jax.models.layers import attention as attention_lib

  implementation, interpreting, tol = "pallas_interpret", contextlib.nullcontext(), 2e-5
  if kernel == "tpu":
    interpreting, tol = tpu_kernel_mode(), TPU_TOL[jnp.float32]
    tpu = attention_lib.FUSED_SEGMENT_KERNELS["tpu"]
    monkeypatch.setitem(attention_lib.FUSED_SEGMENT_KERNELS, "default", tpu)
    implementation = "pallas"
  cfg = _encoder_config()
  ids = jax.random.randint(jax.random.key(1), (2, 40), 3, 64)
  xla = auto_model(cfg, "sequence-classification", attention_implementation="xla")
  fused = auto_model(cfg, "sequence-classification", attention_implementation=implementation)
  variables = xla.init(jax.random.key(0), ids[:, :4])
  segments = jnp.array([[1] * 17 + [2] * 20 + [0] * 3, [1] * 12 + [2] * 28])
  cls_index = jnp.array([[0, 17, 40, 52]])
  mask = jnp.array([[1] * 33 + [0] * 7, [1] * 40])
  with interpreting:
    got_packed = fused.apply(variables, ids, segment_ids=segments, cls_index=cls_index)
    got_hidden = fused.clone(task="base").apply(variables, ids, segment_ids=segments)
    got_padded = fused.clone(task="base").apply(variables, ids, attention_mask=mask)
  want_packed = xla.apply(variables, ids, segment_ids=segments, cls_index=cls_index)
  want_hidden = xla.clone(task="base").apply(variables, ids, segment_ids=segments)
  want_padded = xla.clone(task="base").apply(variables, ids, attention_mask=mask)
  np.testing.assert_allclose(np.asarray(got_packed), np.asarray(want_packed), atol=tol)
  real = np.asarray(segments) > 0
  np.testing.assert_allclose(np.asarray(got_hidden)[real], np.asarray(want_hidden)[real], atol=tol)
  real = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(got_padded)[real], np.asarray(want_padded)[real], atol=tol)


# ---------------------------------------------------------------------------------------------
# Lowering for absent accelerators.

CUSTOM_CALLS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}  # Pallas kernels


def _decoder_step_parts():
  """A decoder with "pallas", LoRA on every linear layer, scanned, rematted, a bf16 base."""
  module = auto_model(
    _config(), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=True, remat=True,
    attention_implementation="pallas",
  )  # fmt: skip
  ids = jnp.ones((2, 40), jnp.int32)
  segments = jnp.array([[1] * 17 + [2] * 20 + [0] * 3, [1] * 40])
  layouts = lora_jax.kernel_layouts(module, ids)
  rule = lora_jax.LoraRule("all-linear", rank=4)
  return module, ids, {"segment_ids": segments}, rule, layouts


def _encoder_step_parts():
  """A RoBERTa classifier with "pallas", LoRA on query and value, a bf16 base, remat, packed
  rows (GLUE's --pack_sequences: segment ids and each sequence's first token)."""

  module = auto_model(
    _encoder_config(), "sequence-classification", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
    remat=True, attention_implementation="pallas",
  )  # fmt: skip
  ids = jnp.ones((2, 40), jnp.int32)
  segments = jnp.array([[1] * 17 + [2] * 20 + [0] * 3, [1] * 12 + [2] * 28])
  kwargs = {"segment_ids": segments, "cls_index": jnp.array([[0, 17, 40, 52]])}
  return module, ids, kwargs, lora_jax.LoraRule(["query", "value"], rank=4), None


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("model", ["decoder", "encoder"])
def test_the_bf16_lora_step_with_pallas_lowers_for_gpu_and_tpu(model, platform):
  """The LoRA training step on packed rows with "pallas" (a scanned, rematted bf16 decoder with
  LoRA on every linear layer; a bf16 RoBERTa classifier) lowers for each accelerator with that
  accelerator's kernel, and not the other's."""
  parts = _decoder_step_parts if model == "decoder" else _encoder_step_parts
  module, ids, kwargs, rule, layouts = parts()
  variables = jax.eval_shape(module.init, jax.random.key(0), ids)
  params = lora_jax.lora_init(variables, rule, rng=jax.random.key(1), layouts=layouts)
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params))
  apply = lora_jax.lora_apply(module.apply)

  def step(trainable, frozen, ids, kwargs):
    def loss(t):
      logits = apply(lora_jax.combine(t, frozen), ids, **kwargs)
      return jnp.mean(logits.astype(jnp.float32) ** 2)

    return jax.grad(loss)(trainable)

  checks = [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALLS[platform])]
  exported = jax.export.export(jax.jit(step), platforms=(platform,), disabled_checks=checks)(
    trainable, frozen, ids, kwargs
  )
  text = exported.mlir_module()
  assert CUSTOM_CALLS[platform] in text, f"the {platform} program has no fused attention kernel"
  other = CUSTOM_CALLS["tpu" if platform == "cuda" else "cuda"]
  assert other not in text


def test_dense_mask_only_and_sliding_windows_and_unknown_names_are_refused():
  q, k, v, _ = _inputs(40, 4, 2, jnp.float32)
  with pytest.raises(ValueError, match="needs the rows' segment ids"):
    attention(q, k, v, None, implementation="pallas_interpret")
  mistral = transformers.MistralConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
  )  # fmt: skip
  model = auto_model(mistral, attention_implementation="pallas_interpret")
  with pytest.raises(ValueError, match=r"has no sliding windows \(this config's: \[8\]\)"):
    model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
  with pytest.raises(
    ValueError, match=r"unknown attention_implementation 'flash'; valid: \(None, "
  ):
    check_implementation("flash")


def test_under_a_mesh_each_device_runs_the_kernel_on_its_rows():
  """In train.engine.parallel's "mesh" mode (a context mesh, rows sharded over it) the kernel
  runs on each device's rows inside a shard_map, which Mosaic needs (XLA cannot partition it):
  the TPU kernel, interpreted on 8 CPU devices, gives XLA's attention of the whole batch."""
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from lora_jax.models.layers import attention as attention_lib

  keys = jax.random.split(jax.random.key(3), 3)
  q, k, v = (jax.random.normal(key, (8, 40, 2, 16)) for key in keys)
  seg = jnp.array([[1] * (10 + i) + [2] * (30 - i) for i in range(8)], jnp.int32)
  mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
  rows = NamedSharding(mesh, P("data"))
  q, k, v, seg = (jax.device_put(x, rows) for x in (q, k, v, seg))
  kernel = functools.partial(attention_lib.FUSED_SEGMENT_KERNELS["tpu"], causal=False)
  with jax.set_mesh(mesh), tpu_kernel_mode():  # the mesh seen while tracing
    fn = jax.jit(lambda q, k, v, seg: attention_lib._per_device(kernel)(q, k, v, seg, None))
    assert "sdy.manual_computation" in fn.lower(q, k, v, seg).as_text()
    got = fn(q, k, v, seg)
  want = _reference(q, k, v, seg, causal=False)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TPU_TOL[jnp.float32])
