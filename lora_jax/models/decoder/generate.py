"""``generate``: batched sampling from a :class:`lora_jax.models.Decoder` with a KV cache.

Prompts of different lengths are left-padded to a power-of-two bucket, so prompts of similar
length share one compiled program. One jitted function per (batch, bucket, new tokens,
greedy or sampled) runs the prefill (all prompt tokens at once, filling a preallocated
:class:`~lora_jax.models.KVCache`) and then a ``lax.while_loop`` whose body is
:func:`decode_step`: one token per row, written into the cache, attending to every slot
before it. The loop stops early once every row has produced an end-of-sequence token.

Adapters in ``variables`` take effect on LoRA's low-rank path (:func:`lora_jax.lora_apply`);
generating from :func:`lora_jax.merge` of them gives the same tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src.apply import lora_apply
from lora_jax._src.bank import bank_names
from lora_jax._src.bank import row_ids
from lora_jax.models.decoder.llama import Decoder
from lora_jax.models.decoder.llama import KVCache
from lora_jax.models.layers.attention import kernel_export_checks

_MIN_BUCKET = 8


def prompt_bucket(length: int) -> int:
  """The padded prompt length: the next power of two, at least 8.

  Example:
    >>> [prompt_bucket(n) for n in (1, 8, 9, 100)]
    [8, 8, 16, 128]
  """
  return max(_MIN_BUCKET, 1 << (int(length) - 1).bit_length())


def sample_token(logits, rng, temperature, top_k, top_p) -> jax.Array:
  """One token per row of ``logits`` ``[batch, vocab]``, sampled from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (``0``: all)
  and then to the smallest set whose probability reaches ``top_p`` (as transformers' logits
  processors, in that order). The settings may be traced: one program serves them all.
  """
  logits = logits.astype(jnp.float32) / temperature
  ordered = -jnp.sort(-logits, axis=-1)
  kth = jnp.take(ordered, jnp.maximum(top_k - 1, 0), axis=-1)[:, None]
  kth = jnp.where(top_k > 0, kth, -jnp.inf)
  ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  smallest = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < jnp.maximum(kth, smallest), -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _next_token(logits, rng, sampling) -> jax.Array:
  if sampling is None:  # greedy
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_token(logits, rng, *sampling)


def decode_step(
  module: Decoder, variables, token, position, cache: KVCache, valid, index, adapter_ids=None
):
  """Logits for one new token per row, and the cache with its key and value written.

  ``token`` and ``position`` ``[batch]``; the token goes into slot ``index`` (a scalar), and
  ``valid`` ``[batch, slots]`` marks the slots holding real tokens (slot ``index`` included).
  Each weight is read once per step: the compiled step's FLOPs are about ``2 * params`` per
  row plus attention over the cache. With an adapter bank, ``adapter_ids`` ``[batch]`` picks
  each row's adapter.
  """
  logits, cache = lora_apply(module.apply)(
    variables,
    token[:, None],
    valid,
    position[:, None],
    cache=cache,
    cache_index=index,
    logits_index=jnp.zeros_like(token),
    adapter_ids=adapter_ids,
  )
  return logits, cache


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens"))
def _generate(
  module: Decoder, variables, ids, valid, eos, rng, sampling, adapter_ids, *, max_new_tokens: int
):
  batch, bucket = ids.shape
  slots = bucket + max_new_tokens
  cache = KVCache.zeros(module.config, batch, slots, module.dtype)
  valid = jnp.concatenate([valid, jnp.zeros((batch, max_new_tokens), valid.dtype)], axis=1)
  lengths = valid.sum(axis=1).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(valid[:, :bucket], axis=1) - 1, 0).astype(jnp.int32)
  logits, cache = lora_apply(module.apply)(
    variables,
    ids,
    valid,
    positions,
    cache=cache,
    cache_index=0,
    logits_index=jnp.full((batch,), bucket - 1, jnp.int32),
    adapter_ids=adapter_ids,
  )
  rng, key = jax.random.split(rng)
  token = _next_token(logits, key, sampling)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)

  def cond(state):
    t, _, _, _, _, done, _ = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, token, out, cache, valid, done, rng = state
    index = bucket + t - 1  # the slot of the token fed in this step
    valid = jax.lax.dynamic_update_slice(valid, jnp.ones((batch, 1), valid.dtype), (0, index))
    logits, cache = decode_step(
      module, variables, token, lengths + t - 1, cache, valid, index, adapter_ids
    )
    rng, key = jax.random.split(rng)
    token = _next_token(logits, key, sampling)
    out = jax.lax.dynamic_update_slice(out, jnp.where(done, 0, token)[:, None], (0, t))
    return t + 1, token, out, cache, valid, done | jnp.isin(token, eos), rng

  state = (jnp.int32(1), token, out, cache, valid, done, rng)
  t, _, out, *_ = jax.lax.while_loop(cond, body, state)
  return out, t


def _check_ids(prompts, vocab_size: int) -> None:
  """Token ids outside the embedding table would read no row (NaN, or zeros): refused."""
  for i, p in enumerate(prompts):
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(
        f"prompts[{i}] holds token id {bad[0]}, outside the model's vocabulary of {vocab_size} "
        f"(ids 0..{vocab_size - 1}): was it tokenized with another model's tokenizer?"
      )


def _check(prompts, max_new_tokens, temperature, top_k, top_p, rng) -> None:
  if not isinstance(prompts, Sequence) or isinstance(prompts, str) or not prompts:
    raise ValueError(f"prompts must be a non-empty list of token-id lists, got {prompts!r:.80}")
  for i, p in enumerate(prompts):
    if isinstance(p, str) or not len(p) or not all(isinstance(t, int | np.integer) for t in p):
      raise ValueError(f"prompts[{i}]={p!r:.80} is not a non-empty list of int token ids")
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
  if not temperature >= 0.0:
    raise ValueError(f"temperature={temperature!r} must be >= 0 (0: greedy)")
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k={top_k!r} must be an int >= 0 (0: no limit)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
  if temperature > 0.0 and rng is None:
    raise ValueError(f"temperature={temperature} samples tokens: pass rng=jax.random.key(...)")


def generate(
  module: Decoder,
  variables,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None = None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  adapter_ids: Sequence[int] | None = None,
) -> list[list[int]]:
  """New tokens for each prompt, from a causal LM with or without adapters.

  Args:
    module: a :class:`lora_jax.models.Decoder` with ``task="causal-lm"``.
    variables: its variables; adapters from :func:`lora_jax.lora_init` (stacked or not) take
      effect on the low-rank path.
    prompts: token-id lists, of different lengths if need be (e.g. from a tokenizer's
      ``apply_chat_template``).
    max_new_tokens: at most this many tokens per prompt.
    eos_token_id: one id or several; a prompt's tokens end at the first of them (included).
    temperature: ``0`` for greedy decoding, else the softmax temperature of sampling.
    top_k: sample among the ``top_k`` most likely tokens only (``0``: no limit).
    top_p: sample among the smallest set of tokens whose probability reaches ``top_p``.
    rng: a ``jax.random`` key, needed when sampling.
    adapter_ids: with an adapter bank (:func:`lora_jax.adapter_bank`) in ``variables``, the
      adapter of each prompt (its index in the bank; ``-1`` for the base alone). All prompts
      decode in one batch, and any mix of ids runs the same compiled program.

  Returns:
    One list of new token ids per prompt, in order.

  Raises:
    ValueError: malformed prompts or settings (named), token ids outside the vocabulary, or a
      module that is not a causal LM.

  Example:
    >>> import jax, transformers
    >>> from lora_jax.models import from_config
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> module, variables = from_config(cfg, "causal-lm", rng=0)
    >>> out = generate(module, variables, [[1, 5, 9], [1, 7]], max_new_tokens=4)
    >>> [len(tokens) for tokens in out]
    [4, 4]
  """
  args = _program_args(
    module, variables, prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, rng,
    adapter_ids,
  )  # fmt: skip
  out, steps = _generate(*args, max_new_tokens=max_new_tokens)
  eos = np.asarray(args[4]).tolist()
  out = np.asarray(out)[:, : int(steps)].tolist()
  result = []
  for tokens in out:
    ends = [i for i, t in enumerate(tokens) if t in eos]
    result.append(tokens[: ends[0] + 1] if ends else tokens)
  return result


def export_generate(
  platform: str,
  module: Decoder,
  variables,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  eos_token_id: int | Sequence[int] | None = None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  rng: jax.Array | None = None,
  adapter_ids: Sequence[int] | None = None,
) -> jax.export.Exported:
  """:func:`generate`'s compiled program for these prompts' shapes (the prompts' prefill, then
  the decoding loop over the KV cache) lowered for ``platform`` (``"cuda"``, ``"tpu"``,
  ``"cpu"``) by ``jax.export``, which needs no such device here. The other arguments are
  :func:`generate`'s; ``variables`` may be ``jax.ShapeDtypeStruct`` trees.

  Example:
    >>> import jax, transformers
    >>> from lora_jax.models import from_config
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> module, variables = from_config(cfg, "causal-lm", rng=0)
    >>> export_generate("tpu", module, variables, [[1, 5, 9]], max_new_tokens=4).platforms
    ('tpu',)
  """
  args = _program_args(
    module, variables, prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, rng,
    adapter_ids,
  )  # fmt: skip
  checks = kernel_export_checks()
  exporter = jax.export.export(_generate, platforms=(platform,), disabled_checks=checks)
  return exporter(*args, max_new_tokens=max_new_tokens)


def _program_args(
  module, variables, prompts, max_new_tokens, eos_token_id, temperature, top_k, top_p, rng,
  adapter_ids,
) -> tuple:  # fmt: skip
  """:func:`generate`'s checks, then ``_generate``'s positional arguments."""
  if not isinstance(module, Decoder) or module.task != "causal-lm":
    raise ValueError(
      f"generate needs a lora_jax.models.Decoder with task='causal-lm', got {module!r:.120}"
    )
  _check(prompts, max_new_tokens, temperature, top_k, top_p, rng)
  _check_ids(prompts, module.config.vocab_size)
  if adapter_ids is not None:
    adapter_ids = row_ids(adapter_ids, bank_names(variables), len(prompts))
  bucket = prompt_bucket(max(len(p) for p in prompts))
  ids = np.zeros((len(prompts), bucket), np.int32)
  valid = np.zeros((len(prompts), bucket), np.int32)
  for i, p in enumerate(prompts):
    ids[i, bucket - len(p) :] = p
    valid[i, bucket - len(p) :] = 1
  eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
  sampling = None  # greedy; else traced settings, so changing them compiles nothing new
  if temperature > 0.0:
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  eos = jnp.asarray(eos or [-1], jnp.int32)
  rng = jax.random.key(0) if rng is None else rng
  return module, variables, ids, valid, eos, rng, sampling, adapter_ids
