"""Llama-family decoders (Llama 2/3, SmolLM2, TinyLlama, Mistral, Qwen2, Qwen3) in Flax linen.

One implementation, read from a transformers config by ``model_type``: grouped-query attention
with rotary embeddings (:mod:`lora_jax.models.layers.rope`), RMSNorm, a SwiGLU MLP, and the family
differences as config fields: q/k/v biases (Qwen2, Llama's ``attention_bias``), RMSNorm on each
query and key head (Qwen3), sliding-window layers (Mistral, Qwen2/3 where configured), tied or
untied embeddings.

Parameters are named after transformers' modules, so PEFT's target names mean the same here:

  ===========================================  ====================================
  Flax path (``params/...``)                   transformers name
  ===========================================  ====================================
  ``model/embed_tokens/embedding``             ``model.embed_tokens.weight``
  ``model/layers/0/self_attn/q_proj/kernel``   ``model.layers.0.self_attn.q_proj.weight`` (T)
  ``model/layers/0/mlp/gate_proj/kernel``      ``model.layers.0.mlp.gate_proj.weight`` (T)
  ``model/layers/0/input_layernorm/scale``     ``model.layers.0.input_layernorm.weight``
  ``model/norm/scale``                         ``model.norm.weight``
  ``lm_head/kernel``                           ``lm_head.weight`` (T; absent when tied)
  ===========================================  ====================================

With ``scan_layers=True`` the layers run under ``nn.scan`` and their parameters are stacked:
``model/layers/self_attn/q_proj/kernel`` is ``[num_layers, in, out]``. One layer is traced and
compiled once however deep the model is; :func:`lora_jax.unstack_layers` and
:func:`lora_jax.stack_layers` convert between the two layouts (``"model/layers"``).

Generation uses an explicit key/value cache (:class:`KVCache`), passed in and returned, so
prefill and each decode step are pure functions (see :mod:`lora_jax.models.decoder.generate`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lora_jax.models.layers import rope as rope_lib
from lora_jax.models.layers.activations import ACTIVATIONS
from lora_jax.models.layers.activations import activation
from lora_jax.models.layers.attention import DENSE_MASK_IMPLEMENTATIONS
from lora_jax.models.layers.attention import SEGMENT_IMPLEMENTATIONS
from lora_jax.models.layers.attention import SegmentMask
from lora_jax.models.layers.attention import attention
from lora_jax.models.layers.attention import check_implementation
from lora_jax.models.layers.attention import mask_segment_ids
from lora_jax.models.layers.attention import same_segment
from lora_jax.models.layers.attention import segment_positions
from lora_jax.models.layers.block import Block
from lora_jax.models.layers.cross_entropy import fused_cross_entropy
from lora_jax.models.layers.rope import config_value

logger = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TASKS = ("causal-lm", "base")
LAYERS = "model/layers"  # the container of the decoder layers, scanned or not
_LAYER_TYPES = ("full_attention", "sliding_attention")
_DROPOUT_RNGS = ("params", "dropout", "lora_dropout")


def _windows(config: Any, model_type: str, layers: int) -> tuple[int | None, ...]:
  """Each layer's sliding window (``None``: full causal attention), as transformers reads it."""
  window = config_value(config, "sliding_window")
  layer_types = config_value(config, "layer_types")
  if layer_types is not None:
    bad = sorted({t for t in layer_types if t not in _LAYER_TYPES})
    if bad:
      raise ValueError(f"unsupported layer_types {bad} in the config; supported: {_LAYER_TYPES}")
    if len(layer_types) != layers:
      raise ValueError(f"layer_types has {len(layer_types)} entries for {layers} layers")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
  if model_type == "mistral":
    return (window,) * layers
  if model_type in ("qwen2", "qwen3") and config_value(config, "use_sliding_window", False):
    first = config_value(config, "max_window_layers", layers)
    return tuple(window if i >= first else None for i in range(layers))
  return (None,) * layers


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The fields of a Llama-family transformers config that the Flax model uses.

  Hashable and immutable (a Flax module attribute); build one with :meth:`from_hf`.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  hidden_act: str
  rms_norm_eps: float
  rope: rope_lib.Rope
  tie_word_embeddings: bool
  qkv_bias: bool
  o_bias: bool
  mlp_bias: bool
  qk_norm: bool
  sliding_windows: tuple[int | None, ...]
  initializer_range: float = 0.02

  @classmethod
  def from_hf(cls, config: Any) -> DecoderConfig:
    """Reads and checks a transformers config (object or ``config.json`` dict).

    Example:
      >>> import transformers
      >>> cfg = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4,
      ...                                num_key_value_heads=2, num_hidden_layers=2)
      >>> c = DecoderConfig.from_hf(cfg)
      >>> c.head_dim, c.qkv_bias, c.o_bias, c.qk_norm
      (16, True, False, False)
    """
    model_type = config_value(config, "model_type")
    if model_type not in MODEL_TYPES:
      raise ValueError(
        f"unsupported model_type {model_type!r} for a decoder; supported: {', '.join(MODEL_TYPES)}"
      )
    where = f"{model_type} config"
    act = config_value(config, "hidden_act", "silu")
    activation(act, where)
    hidden, heads = (
      int(config_value(config, "hidden_size")),
      int(config_value(config, "num_attention_heads")),
    )
    kv_heads = int(config_value(config, "num_key_value_heads") or heads)
    if heads % kv_heads:
      raise ValueError(
        f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads} ({where})"
      )
    head_dim = config_value(config, "head_dim") or hidden // heads
    if not config_value(config, "head_dim") and hidden % heads:
      raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if float(config_value(config, "attention_dropout", 0.0) or 0.0):
      logger.warning(
        "%s: attention_dropout=%s is not applied (jax.nn.dot_product_attention has none)",
        where,
        config_value(config, "attention_dropout"),
      )
    layers = int(config_value(config, "num_hidden_layers"))
    attention_bias = bool(config_value(config, "attention_bias", False))
    qwen2 = model_type == "qwen2"
    return cls(
      model_type=model_type,
      vocab_size=int(config_value(config, "vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(config_value(config, "intermediate_size")),
      num_hidden_layers=layers,
      num_attention_heads=heads,
      num_key_value_heads=kv_heads,
      head_dim=int(head_dim),
      hidden_act=act,
      rms_norm_eps=float(config_value(config, "rms_norm_eps", 1e-6)),
      rope=rope_lib.rope_settings(config),
      tie_word_embeddings=bool(config_value(config, "tie_word_embeddings", False)),
      qkv_bias=qwen2 or attention_bias,
      o_bias=attention_bias and not qwen2,
      mlp_bias=bool(config_value(config, "mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      sliding_windows=_windows(config, model_type, layers),
      initializer_range=float(config_value(config, "initializer_range", 0.02)),
    )


class KVCache(NamedTuple):
  """Keys and values of every layer: ``k``, ``v`` ``[layers, batch, slots, kv_heads, head_dim]``.

  Slot ``j`` of row ``b`` holds the token written there by an earlier call; which slots hold
  real tokens is the caller's ``attention_mask`` ``[batch, slots]``.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, config: DecoderConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_hidden_layers, batch, slots, config.num_key_value_heads, config.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class RMSNorm(nn.Module):
  """transformers' ``LlamaRMSNorm``: normalised in float32, cast back, then scaled."""

  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class _Base(Block):
  """A decoder module (``config`` a :class:`DecoderConfig`)."""

  def norm(self, name: str) -> RMSNorm:
    return RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)


class Attention(_Base):
  """``q_proj``/``k_proj``/``v_proj``/``o_proj`` with grouped-query attention and RoPE."""

  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x, cos, sin, mask, kv=None, cache_index=None):
    cfg = self.config
    batch, seq, _ = x.shape
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = self.dense(heads * dim, "q_proj", cfg.qkv_bias)(x).reshape(batch, seq, heads, dim)
    k = self.dense(kv_heads * dim, "k_proj", cfg.qkv_bias)(x).reshape(batch, seq, kv_heads, dim)
    v = self.dense(kv_heads * dim, "v_proj", cfg.qkv_bias)(x).reshape(batch, seq, kv_heads, dim)
    if cfg.qk_norm:  # Qwen3: RMSNorm over each head, before the rotation
      q, k = self.norm("q_norm")(q), self.norm("k_norm")(k)
    q, k = rope_lib.apply_rope(q, cos, sin), rope_lib.apply_rope(k, cos, sin)
    if kv is not None:  # write this call's keys and values into the cache, attend to all slots
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      kv = (k, v)
    implementation = self.attention_implementation
    if kv is not None and implementation in SEGMENT_IMPLEMENTATIONS:
      implementation = "xla"  # cached decoding: queries against cache slots, no segment ids
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation)
    return self.dense(cfg.hidden_size, "o_proj", cfg.o_bias)(out.reshape(batch, seq, -1)), kv


class MLP(_Base):
  """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = self.dense(cfg.intermediate_size, "gate_proj", cfg.mlp_bias)(x)
    up = self.dense(cfg.intermediate_size, "up_proj", cfg.mlp_bias)(x)
    return self.dense(cfg.hidden_size, "down_proj", cfg.mlp_bias)(
      ACTIVATIONS[cfg.hidden_act](gate) * up
    )


class DecoderLayer(_Base):
  """Pre-norm block: ``x + self_attn(input_layernorm(x))``, then ``+ mlp(post_attention_...)``.

  ``window`` (``None`` or a per-layer int, traced under ``nn.scan``) limits attention to keys
  fewer than ``window`` slots back; ``distance`` ``[seq, slots]`` is query slot minus key slot.
  Returns ``(x, kv)``: the carry and per-layer output of ``nn.scan``.
  """

  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x, cos, sin, mask, distance, window, kv, cache_index):
    if window is not None:  # no segment-id form: only kernels that take a dense mask
      mask = SegmentMask(
        (mask.dense if isinstance(mask, SegmentMask) else mask) & (distance < window)
      )
    attn = self.child(
      Attention, "self_attn", attention_implementation=self.attention_implementation
    )
    y, kv = attn(self.norm("input_layernorm")(x), cos, sin, mask, kv, cache_index)
    x = x + y
    mlp = MLP(self.config, self.dtype, self.param_dtype, name="mlp")
    return x + mlp(self.norm("post_attention_layernorm")(x)), kv


class _LayerList(_Base):
  """Unscanned layers, children ``0``, ``1``, ... as in transformers' ``ModuleList``."""

  attention_implementation: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, cos, sin, mask, distance, windows, cache, cache_index):
    layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    ks, vs = [], []
    for i in range(self.config.num_hidden_layers):
      layer = self.child(layer_cls, str(i), attention_implementation=self.attention_implementation)
      window = None if windows is None else windows[i]
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = layer(x, cos, sin, mask, distance, window, kv, cache_index)
      if kv is not None:
        ks.append(kv[0])
        vs.append(kv[1])
    return x, (KVCache(jnp.stack(ks), jnp.stack(vs)) if cache is not None else None)


def _scanned_layers(config: DecoderConfig, remat: bool):
  layer_cls = nn.remat(DecoderLayer, prevent_cse=False) if remat else DecoderLayer
  return nn.scan(
    layer_cls,
    variable_axes={"params": 0},
    split_rngs={name: True for name in _DROPOUT_RNGS},
    # x is the carry; cos, sin, mask, distance and cache_index are shared by every layer;
    # the windows and the cache have a leading layer axis.
    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
    length=config.num_hidden_layers,
  )


class DecoderModel(_Base):
  """transformers' ``LlamaModel``: ``embed_tokens``, ``layers``, final ``norm``."""

  attention_implementation: str | None = None
  scan_layers: bool = False
  remat: bool = False

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.initializers.normal(cfg.initializer_range),
    )
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan_layers:
      self.layers = _scanned_layers(cfg, self.remat)(
        **kw, attention_implementation=self.attention_implementation
      )
    else:
      self.layers = _LayerList(
        **kw, attention_implementation=self.attention_implementation, remat=self.remat
      )
    self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype)

  def __call__(self, input_ids, positions, mask, distance, cache, cache_index):
    cfg = self.config
    x = self.embed_tokens(input_ids)
    cos, sin = rope_lib.cos_sin(
      rope_lib.inverse_frequencies(cfg.rope, cfg.head_dim), positions, x.dtype
    )
    windows = None
    if any(w is not None for w in cfg.sliding_windows):
      big = jnp.iinfo(jnp.int32).max  # no window
      windows = jnp.array([big if w is None else w for w in cfg.sliding_windows], jnp.int32)
      if not self.scan_layers:
        windows = list(cfg.sliding_windows)
    if self.scan_layers:
      kv = None if cache is None else (cache.k, cache.v)
      x, kv = self.layers(x, cos, sin, mask, distance, windows, kv, cache_index)
      cache = None if kv is None else KVCache(*kv)
    else:
      x, cache = self.layers(x, cos, sin, mask, distance, windows, cache, cache_index)
    return self.norm(x), cache

  def attend(self, x):
    return self.embed_tokens.attend(x)


class Decoder(_Base):
  """A Llama-family decoder: transformers' ``*ForCausalLM`` (``task="causal-lm"``) or ``*Model``.

  Call it as ``module.apply(variables, input_ids, attention_mask=None, position_ids=None)``:

  * ``input_ids`` ``[batch, seq]``; ``attention_mask`` ``[batch, seq]`` (1: real token) for
    padded rows, on either side. Positions default to the count of real tokens before each one
    (``cumsum(mask) - 1``, as transformers' ``generate`` computes them), so left and right padding
    give each sequence the logits it gets alone.
  * Returns float32 logits ``[batch, seq, vocab]`` (``"causal-lm"``) or the final hidden states
    ``[batch, seq, hidden]`` in ``dtype`` (``"base"``).

  Keyword-only inputs:

  * ``segment_ids`` ``[batch, seq]``: padding-free rows packing several sequences, numbered
    ``1, 2, ...`` per row (``0``: padding). Attention stays causal within each sequence and
    positions restart at 0 per sequence, so each gets the logits it gets alone.
  * ``cache`` (a :class:`KVCache` of ``slots`` slots) and ``cache_index`` (int scalar): the
    tokens are written at slots ``cache_index ...`` and attend to every slot up to their own
    that ``attention_mask`` ``[batch, slots]`` marks real. Returns ``(output, new_cache)``.
  * ``logits_index`` ``[batch]``: compute the output at one position per row only
    (``[batch, vocab]``), e.g. the last prompt token when generating; ``[batch, k]``: at ``k``
    positions per row (``[batch, k, vocab]``), e.g. a loss's target positions.
  * ``target_ids`` (``"causal-lm"`` only), the token each output position should predict
    (``[batch, seq]``, or the shape of ``logits_index``): returns float32 per-position
    cross-entropies of that shape in place of logits, computed by
    :func:`lora_jax.models.fused_cross_entropy` ``loss_chunk_size`` positions at a time, so
    the ``[tokens, vocab]`` logits never exist whole. Needs a plain output layer (no adapter,
    not quantized).
  * ``deterministic`` is accepted for symmetry with the encoders (these models have no dropout
    of their own; LoRA dropout follows :func:`lora_jax.lora_apply`'s rules).

  Attributes:
    config: a :class:`DecoderConfig` (see :func:`auto_model` to build from transformers).
    task: ``"causal-lm"`` or ``"base"``.
    dtype: compute dtype; RMSNorm statistics, RoPE angles and softmax are float32.
    param_dtype: parameter dtype.
    scan_layers: run the layers under ``nn.scan`` with stacked parameters.
    remat: rematerialise each layer in the backward pass.
    attention_implementation: ``None`` (cuDNN on GPU for 16-bit dtypes, else XLA), ``"xla"``,
      ``"xla_chunked"`` (XLA's, a block of queries at a time), ``"cudnn"``, ``"pallas"``
      (Pallas's fused kernel from segment ids: packed and padded rows without a dense mask;
      Triton on GPUs, Mosaic on TPUs, XLA elsewhere, chosen when the program is lowered; calls
      with a cache use XLA's attention; no sliding windows) or ``"pallas_interpret"`` (the
      Triton kernel interpreted by JAX, any backend, slow: for tests).
  """

  task: str = "causal-lm"
  scan_layers: bool = False
  remat: bool = False
  attention_implementation: str | None = None

  def setup(self):
    if self.task not in TASKS:
      raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
    windows = [w for w in self.config.sliding_windows if w is not None]
    if self.attention_implementation in SEGMENT_IMPLEMENTATIONS and windows:
      raise ValueError(
        f"attention_implementation={self.attention_implementation!r} has no sliding windows "
        f"(this config's: {sorted(set(windows))}); valid for it: {DENSE_MASK_IMPLEMENTATIONS}"
      )
    self.model = DecoderModel(
      self.config,
      self.dtype,
      self.param_dtype,
      attention_implementation=self.attention_implementation,
      scan_layers=self.scan_layers,
      remat=self.remat,
    )
    if self.task == "causal-lm" and not self.config.tie_word_embeddings:
      self.lm_head = self.dense(self.config.vocab_size, "lm_head", use_bias=False)

  def __call__(
    self,
    input_ids,
    attention_mask=None,
    position_ids=None,
    deterministic: bool = True,
    *,
    segment_ids=None,
    cache: KVCache | None = None,
    cache_index=None,
    logits_index=None,
    target_ids=None,
    loss_chunk_size: int = 256,
  ):
    del deterministic  # no dropout of its own
    input_ids = jnp.asarray(input_ids)
    batch, seq = input_ids.shape
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids= (packed rows) cannot be combined with a cache=")
    if cache is not None:
      if cache_index is None or attention_mask is None:
        raise ValueError("with cache=, pass cache_index= and the slots' attention_mask=")
      slots = cache.k.shape[2]
    else:
      cache_index, slots = 0, seq
    q_slot = cache_index + jnp.arange(seq, dtype=jnp.int32)
    distance = q_slot[:, None] - jnp.arange(slots, dtype=jnp.int32)[None, :]
    mask = jnp.broadcast_to((distance >= 0)[None, None], (batch, 1, seq, slots))
    if attention_mask is not None:
      valid = jnp.asarray(attention_mask).astype(bool)
      if valid.shape != (batch, slots):
        raise ValueError(
          f"attention_mask has shape {valid.shape}; expected {(batch, slots)} (batch, "
          f"{'cache slots' if cache is not None else 'sequence'})"
        )
      mask = mask & valid[:, None, None, :]
    if segment_ids is not None:
      mask = mask & same_segment(segment_ids)
    segments = (
      None if cache is not None else mask_segment_ids(segment_ids, attention_mask, (batch, seq))
    )
    mask = SegmentMask(mask, segments)
    if position_ids is None:
      if segment_ids is not None:
        position_ids = segment_positions(jnp.asarray(segment_ids))
      elif attention_mask is not None:
        count = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
        position_ids = jnp.maximum(jnp.take(count, q_slot, axis=1), 0)
      else:
        position_ids = jnp.broadcast_to(q_slot, (batch, seq))
    x, cache = self.model(input_ids, position_ids, mask, distance, cache, cache_index)
    if logits_index is not None:
      index = jnp.asarray(logits_index)
      picked = index[:, None] if index.ndim == 1 else index
      x = jnp.take_along_axis(x, picked[:, :, None], axis=1)
      x = x[:, 0] if index.ndim == 1 else x
    if target_ids is not None:
      x = self._token_losses(x, target_ids, loss_chunk_size)
    elif self.task == "causal-lm":
      x = (self.model.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)).astype(
        jnp.float32
      )
    return x if cache is None else (x, cache)

  def _token_losses(self, x, target_ids, chunk_size: int):
    """:func:`fused_cross_entropy` of the final hidden states ``x`` with the output layer."""
    if self.task != "causal-lm":
      raise ValueError(f"target_ids= needs task='causal-lm', not {self.task!r}")
    tied = self.config.tie_word_embeddings
    if self.is_initializing() and not tied:  # create the kernel the usual way
      self.lm_head(x)
    path, weight = output_weight(self.config, self.variables["params"])
    if weight is None:
      raise ValueError(
        f"target_ids= needs a plain output layer, but params/{path} holds an adapter or a "
        "quantized weight; call without target_ids= for logits"
      )
    return fused_cross_entropy(
      x, weight, target_ids, vocab_axis=0 if tied else 1, chunk_size=chunk_size,
      dtype=self.dtype,
    )  # fmt: skip


def output_weight(config: DecoderConfig, params: Mapping) -> tuple[str, jax.Array | None]:
  """``(path, weight)`` of a causal LM's output layer in ``params`` (the ``"params"``
  collection): the tied ``embed_tokens`` table ``[vocab, hidden]`` or the ``lm_head`` kernel
  ``[hidden, vocab]``; ``weight`` is None when the layer carries more than its weight (an
  adapter, or a quantized weight), so its output needs the module's own call."""
  tied = config.tie_word_embeddings
  path, leaf = ("model/embed_tokens", "embedding") if tied else ("lm_head", "kernel")
  layer = params
  for name in path.split("/"):
    layer = layer[name]
  plain = set(layer) == {leaf} and isinstance(layer[leaf], (jax.Array, np.ndarray))
  return path, layer[leaf] if plain else None


def auto_model(
  config: Any,
  task: str = "causal-lm",
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  scan_layers: bool = False,
  remat: bool = False,
  attention_implementation: str | None = None,
) -> Decoder:
  """The Flax :class:`Decoder` for a Llama-family transformers config (module only).

  Example:
    >>> import jax, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = auto_model(cfg, scan_layers=True)
    >>> ids = jnp.ones((1, 5), jnp.int32)
    >>> shapes = jax.eval_shape(model.init, jax.random.key(0), ids)  # nothing allocated
    >>> shapes["params"]["model"]["layers"]["self_attn"]["k_proj"]["kernel"].shape
    (2, 32, 16)
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r} for a decoder; valid: {', '.join(TASKS)}")
  check_implementation(attention_implementation)
  cfg = config if isinstance(config, DecoderConfig) else DecoderConfig.from_hf(config)
  return Decoder(
    cfg,
    dtype,
    param_dtype,
    task=task,
    scan_layers=scan_layers,
    remat=remat,
    attention_implementation=attention_implementation,
  )
