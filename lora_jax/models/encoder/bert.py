"""BERT and RoBERTa encoders in Flax linen, laid out like Hugging Face's PyTorch models.

One implementation serves both families: they differ only in how position ids are made
(BERT: ``0..T-1``; RoBERTa: ``pad_token_id + cumsum(input_ids != pad_token_id)``, padding keeps
``pad_token_id``) and in the sequence-classification head (see :mod:`.heads`).

Every parameter lives in a plain ``nn.Dense`` / ``nn.Embed`` / ``nn.LayerNorm`` named after the
Hugging Face module it mirrors (``encoder/layer/0/attention/self/query/kernel`` is
``encoder.layer.0.attention.self.query.weight`` transposed), so LoRA's interception of
``nn.Dense.__call__`` / ``nn.Embed.__call__`` works unchanged and checkpoints map one to one.

Attention runs through ``jax.nn.dot_product_attention``. It has no attention-probability
dropout, so ``attention_probs_dropout_prob`` is ignored; hidden-state and classifier dropout are
applied as in transformers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from lora_jax.models.encoder import heads
from lora_jax.models.layers.activations import ACTIVATIONS
from lora_jax.models.layers.activations import activation
from lora_jax.models.layers.activations import gelu_exact  # noqa: F401  (its home before activations)
from lora_jax.models.layers.attention import SegmentMask
from lora_jax.models.layers.attention import attention
from lora_jax.models.layers.attention import check_implementation
from lora_jax.models.layers.attention import mask_segment_ids
from lora_jax.models.layers.attention import same_segment
from lora_jax.models.layers.attention import segment_positions
from lora_jax.models.layers.block import Block

TASKS = ("base", "sequence-classification")
MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The fields of a transformers ``BertConfig`` / ``RobertaConfig`` the Flax model uses.

  Hashable and immutable, so it can be a Flax module attribute. Field names are transformers'.
  Build one with :meth:`from_hf`.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  hidden_act: str
  hidden_dropout_prob: float
  classifier_dropout: float
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  pad_token_id: int
  initializer_range: float
  num_labels: int

  @classmethod
  def from_hf(cls, config: Any) -> EncoderConfig:
    """Reads and checks a transformers config; errors name the bad value and the valid ones.

    Example:
      >>> import transformers
      >>> EncoderConfig.from_hf(transformers.RobertaConfig(num_labels=3)).num_labels
      3
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
      raise ValueError(
        f"unsupported model_type {model_type!r} (from {type(config).__name__}); "
        f"supported: {', '.join(MODEL_TYPES)}"
      )
    act = config.hidden_act
    activation(act, f"{model_type} config")
    position_type = getattr(config, "position_embedding_type", None) or "absolute"
    if position_type != "absolute":
      raise ValueError(
        f"unsupported position_embedding_type {position_type!r}; supported: 'absolute'"
      )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
      raise ValueError("is_decoder / add_cross_attention configs are not supported (encoder only)")
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(
        f"hidden_size {config.hidden_size} is not a multiple of "
        f"num_attention_heads {config.num_attention_heads}"
      )
    cls_dropout = getattr(config, "classifier_dropout", None)
    return cls(
      model_type=model_type,
      vocab_size=config.vocab_size,
      hidden_size=config.hidden_size,
      num_hidden_layers=config.num_hidden_layers,
      num_attention_heads=config.num_attention_heads,
      intermediate_size=config.intermediate_size,
      hidden_act=act,
      hidden_dropout_prob=float(config.hidden_dropout_prob),
      classifier_dropout=float(config.hidden_dropout_prob if cls_dropout is None else cls_dropout),
      max_position_embeddings=config.max_position_embeddings,
      type_vocab_size=config.type_vocab_size,
      layer_norm_eps=float(config.layer_norm_eps),
      pad_token_id=int(config.pad_token_id if config.pad_token_id is not None else 0),
      initializer_range=float(config.initializer_range),
      num_labels=int(config.num_labels),
    )


def position_ids_for(config: EncoderConfig, input_ids: jax.Array) -> jax.Array:
  """Default position ids, exactly as transformers makes them.

  BERT: ``0..T-1``. RoBERTa (``create_position_ids_from_input_ids``): non-padding tokens count
  up from ``pad_token_id + 1``; padding tokens get ``pad_token_id``.

  Example:
    >>> import numpy as np, transformers
    >>> cfg = EncoderConfig.from_hf(transformers.RobertaConfig())
    >>> np.asarray(position_ids_for(cfg, jnp.array([[0, 5, 2, 1, 1]]))).tolist()
    [[2, 3, 4, 1, 1]]
  """
  if config.model_type == "roberta":
    mask = (input_ids != config.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(mask, axis=1) * mask + config.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def packed_position_ids(config: EncoderConfig, segment_ids: jax.Array) -> jax.Array:
  """Position ids for rows that pack several sequences (see :class:`Bert`, ``segment_ids``).

  Each sequence counts from the start, as if it were alone in its row: ``0, 1, ...`` for BERT,
  ``pad_token_id + 1, ...`` for RoBERTa (padding, segment 0, gets ``pad_token_id``), so a packed
  sequence is embedded exactly as :func:`position_ids_for` embeds it unpacked.

  Example:
    >>> import numpy as np, transformers
    >>> cfg = EncoderConfig.from_hf(transformers.BertConfig())
    >>> np.asarray(packed_position_ids(cfg, jnp.array([[1, 1, 1, 2, 2, 0]]))).tolist()
    [[0, 1, 2, 0, 1, 0]]
  """
  offset = segment_positions(segment_ids)
  if config.model_type == "roberta":
    return jnp.where(segment_ids > 0, offset + config.pad_token_id + 1, config.pad_token_id)
  return offset


class _Base(Block):
  """An encoder module (``config`` an :class:`EncoderConfig`)."""

  def layer_norm(self, name: str = "LayerNorm") -> nn.LayerNorm:
    return nn.LayerNorm(
      epsilon=self.config.layer_norm_eps,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )

  def embed(self, num: int, name: str) -> nn.Embed:
    return nn.Embed(
      num,
      self.config.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.initializers.normal(self.config.initializer_range),
      name=name,
    )


class BertEmbeddings(_Base):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
    cfg = self.config
    x = self.embed(cfg.vocab_size, "word_embeddings")(input_ids)
    x = x + self.embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = x + self.embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
    x = self.layer_norm()(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


_QKV = ("query", "key", "value")


class BertSelfAttention(_Base):
  """``query`` / ``key`` / ``value`` projections (each ``Dense(hidden)``) and attention."""

  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    heads_shape = (*x.shape[:-1], cfg.num_attention_heads, -1)
    q, k, v = (self.dense(cfg.hidden_size, n)(x).reshape(heads_shape) for n in _QKV)
    out = attention(q, k, v, mask, self.attention_implementation)
    return out.reshape(x.shape)


class BertResidualOutput(_Base):
  """``LayerNorm(dropout(dense(x)) + residual)``: HF's ``BertSelfOutput`` and ``BertOutput``."""

  @nn.compact
  def __call__(self, x, residual, deterministic: bool = True):
    x = self.dense(self.config.hidden_size, "dense")(x)
    x = nn.Dropout(self.config.hidden_dropout_prob)(x, deterministic=deterministic)
    return self.layer_norm()(x + residual)


class BertAttention(_Base):
  """``self`` attention followed by its ``output`` projection and residual LayerNorm."""

  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    y = BertSelfAttention(
      **kw, attention_implementation=self.attention_implementation, name="self"
    )(x, mask)
    return BertResidualOutput(**kw, name="output")(y, x, deterministic)


class BertIntermediate(_Base):
  """``dense`` to ``intermediate_size`` and the ``hidden_act`` activation."""

  @nn.compact
  def __call__(self, x):
    x = self.dense(self.config.intermediate_size, "dense")(x)
    return ACTIVATIONS[self.config.hidden_act](x)


class BertLayer(_Base):
  """One transformer block: ``attention``, ``intermediate``, ``output``."""

  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    impl = self.attention_implementation
    x = BertAttention(**kw, attention_implementation=impl, name="attention")(x, mask, deterministic)
    y = BertIntermediate(**kw, name="intermediate")(x)
    return BertResidualOutput(**kw, name="output")(y, x, deterministic)


class _LayerStack(_Base):
  """The ``layer`` container: children named ``0``, ``1``, ... as in HF's ``ModuleList``."""

  attention_implementation: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    # ``deterministic`` is argument 3 counting ``self``; remat must see it as a Python bool.
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.config.num_hidden_layers):
      layer = self.child(layer_cls, str(i), attention_implementation=self.attention_implementation)
      x = layer(x, mask, deterministic)
    return x


class BertEncoder(_Base):
  """The ``encoder`` module: ``encoder/layer/{i}/...``."""

  attention_implementation: str | None = None
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    return _LayerStack(
      self.config,
      self.dtype,
      self.param_dtype,
      attention_implementation=self.attention_implementation,
      remat=self.remat,
      name="layer",
    )(x, mask, deterministic)


class Bert(_Base):
  """BERT or RoBERTa encoder (``config.model_type``), optionally with a classification head.

  Dropout (embeddings, hidden states, classifier) is active with ``deterministic=False`` and a
  ``rngs={"dropout": key}``; attention-probability dropout is never applied
  (``jax.nn.dot_product_attention`` has none).

  Packed rows (padding-free batches, as transformers' ``DataCollatorWithFlattening``): several
  sequences share a row, ``segment_ids`` ``[rows, seq]`` numbers them ``1, 2, ...`` within the
  row (``0``: padding). Each token attends only to its own sequence and position ids restart
  per sequence (:func:`packed_position_ids`), so every sequence gets the hidden states it gets
  alone in a padded row. The classification head then needs ``cls_index`` ``[groups, n]``:
  the flat index of each sequence's first token within its group of ``rows / groups``
  consecutive rows (one group per data-parallel shard; ``[1, n]`` on one device); the logits
  are ``[groups * n, num_labels]``.

  Attributes:
    config: an :class:`EncoderConfig` (see :func:`auto_model` to build from transformers).
    task: ``"base"`` returns the last hidden state ``[batch, seq, hidden]`` (in ``dtype``);
      ``"sequence-classification"`` returns float32 logits ``[batch, num_labels]``
      (``num_labels == 1`` is regression, still ``[batch, 1]``).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); LayerNorm statistics and softmax are float32.
    param_dtype: parameter dtype.
    remat: rematerialise each layer in the backward pass (``nn.remat``); parameter names are
      unchanged.
    attention_implementation: ``None`` (cuDNN on GPU for 16-bit dtypes, else XLA), ``"xla"``,
      ``"xla_chunked"`` (XLA's, a block of queries at a time), ``"cudnn"``, ``"pallas"``
      (Pallas's fused kernel from the segment ids: packed rows without a dense mask, on GPUs
      and TPUs; XLA's attention elsewhere) or ``"pallas_interpret"`` (tests).
  """

  task: str = "base"
  remat: bool = False
  attention_implementation: str | None = None

  @nn.compact
  def __call__(
    self,
    input_ids,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    deterministic: bool = True,
    *,
    segment_ids=None,
    cls_index=None,
  ):
    cfg = self.config
    if self.task not in TASKS:
      raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
    input_ids = jnp.asarray(input_ids)
    batch, seq = input_ids.shape
    if cls_index is not None and segment_ids is None:
      raise ValueError("cls_index= is for packed rows: pass their segment_ids= too")
    if segment_ids is not None and self.task != "base" and cls_index is None:
      raise ValueError(
        "packed rows (segment_ids=) need cls_index= for a sequence-classification head: the "
        "index of each sequence's first token"
      )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      if segment_ids is None:
        position_ids = position_ids_for(cfg, input_ids)
      else:
        position_ids = packed_position_ids(cfg, jnp.asarray(segment_ids))
    mask = None
    if attention_mask is not None:
      mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
    if segment_ids is not None:  # a token sees the tokens of its own sequence only
      same = same_segment(segment_ids)
      mask = same if mask is None else mask & same
    if mask is not None:
      # Full [B, 1, T, S]: cuDNN takes the mask as a bias and wants both sequence axes.
      mask = jnp.broadcast_to(mask, (batch, 1, seq, seq))
    # the same mask as segment ids, for the fused kernels (bidirectional within a sequence)
    segments = mask_segment_ids(segment_ids, attention_mask, (batch, seq))
    mask = SegmentMask(mask, segments, causal=False)

    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    x = BertEmbeddings(**kw, name="embeddings")(
      input_ids, token_type_ids, position_ids, deterministic
    )
    x = BertEncoder(
      **kw,
      attention_implementation=self.attention_implementation,
      remat=self.remat,
      name="encoder",
    )(x, mask, deterministic)
    if self.task == "base":
      return x
    if cls_index is not None:  # each sequence's first token, as [sequences, 1, hidden]
      idx = jnp.asarray(cls_index)
      groups = x.reshape(idx.shape[0], -1, x.shape[-1])
      x = jnp.take_along_axis(groups, idx[..., None], axis=1).reshape(-1, 1, x.shape[-1])
    if cfg.model_type == "roberta":
      logits = heads.RobertaClassificationHead(**kw, name="classifier")(x, deterministic)
    else:
      pooled = heads.BertPooler(**kw, name="pooler")(x)
      pooled = nn.Dropout(cfg.classifier_dropout)(pooled, deterministic=deterministic)
      logits = self.dense(cfg.num_labels, "classifier")(pooled)
    return logits.astype(jnp.float32)


def auto_model(
  config: Any,
  task: str = "base",
  *,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
  attention_implementation: str | None = None,
) -> Bert:
  """The Flax module for a transformers config; ``config.model_type`` picks the family.

  Args:
    config: a transformers ``BertConfig`` or ``RobertaConfig`` (or an :class:`EncoderConfig`).
    task: ``"base"`` (last hidden state) or ``"sequence-classification"`` (logits; BERT:
      pooler + dropout + ``classifier``; RoBERTa: ``classifier/dense`` + tanh +
      ``classifier/out_proj``).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialise each layer (``nn.remat``).
    attention_implementation: ``None``, ``"xla"``, ``"xla_chunked"``, ``"cudnn"``, ``"pallas"``
      or ``"pallas_interpret"`` (see :func:`attention`).

  Returns:
    A :class:`Bert` module; call it as ``module.apply(variables, input_ids,
    attention_mask=None, token_type_ids=None, position_ids=None, deterministic=True)``.

  Raises:
    ValueError: unsupported ``model_type``, ``hidden_act`` or ``task``.

  Example:
    >>> import jax, transformers
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=16)
    >>> model = auto_model(cfg, "sequence-classification")
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> variables = model.init(jax.random.key(0), ids)
    >>> model.apply(variables, ids, attention_mask=jnp.ones_like(ids)).shape
    (2, 2)
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
  check_implementation(attention_implementation)
  cfg = config if isinstance(config, EncoderConfig) else EncoderConfig.from_hf(config)
  return Bert(
    cfg,
    dtype,
    param_dtype,
    task=task,
    remat=remat,
    attention_implementation=attention_implementation,
  )
