"""Adapter banks: many adapters over one frozen base, each row of a batch using its own.

:func:`adapter_bank` stacks the adapters of several trees made over the same base (by
:func:`lora_jax.lora_init`, :func:`lora_jax.load_adapter` or :func:`lora_jax.import_peft`)
into one tree that holds the base once. Each banked module carries, beside its weight:

* ``lora_a``: ``[*stacked, n, *in, r]`` and ``lora_b``: ``[*stacked, n, r, *out]``, float32,
  adapter ``i`` in slice ``i`` of the bank axis (after any ``nn.scan`` layer axes), its rank
  zero-padded to the bank's ``r`` (the largest rank at that module);
* ``lora_scale``: ``[*stacked, n]`` float32, each adapter's ``alpha / r`` (or rsLoRA's
  ``alpha / sqrt(r)``), zero where an adapter has no module here: a value, not static, so
  that swapping an adapter for one of another alpha compiles nothing new;
* ``lora_bank``: a static :class:`BankSpec` (the adapters' names in order, the padded rank,
  the weight's layout).

:func:`lora_jax.lora_apply` runs a bank with ``adapter_ids=`` (one id per row, ``-1`` for the
base alone): each row gathers its own ``A`` and ``B`` (``[batch, in, r]``) and takes two
batched matmuls, so a mixed batch costs about what one adapter's batch of the same size costs
and the base is never copied per adapter.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import LoraSpec

LORA_BANK = "lora_bank"
LORA_SCALE = "lora_scale"
BANK_LEAVES = (LORA_A, LORA_B, LORA_SCALE)


@dataclasses.dataclass(frozen=True)
class BankSpec:
  """Static description of one banked module: which adapters, in which order, at which rank.

  Attributes:
    names: the adapters' names, in the order of the bank axis (``adapter_ids`` index it).
    rank: the padded rank ``r`` of ``lora_a``/``lora_b`` here.
    weight: the adapted leaf, ``"kernel"`` or ``"embedding"``.
    in_axes: the weight's input axes (of one layer).
    out_axes: the weight's output axes.
    stacked: leading ``nn.scan`` layer axes of the weight, before the bank axis.
    dropout: each adapter's LoRA dropout rate (used in training, per row; static, so a swap
      that changes a rate compiles once more, unlike ranks and alphas, which are values).
  """

  names: tuple[str, ...]
  rank: int
  weight: str
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]
  stacked: int = 0
  dropout: tuple[float, ...] = ()


jax.tree_util.register_static(BankSpec)


def _adapters(tree: Mapping) -> dict[str, Mapping]:
  return {p: m for p, m in paths.iter_modules(tree) if LORA_SPEC in m}


def _check_spec(name: str, path: str, spec: LoraSpec) -> None:
  if spec.use_dora:
    raise ValueError(
      f"adapter {name!r} is a DoRA adapter at {path!r}: an adapter bank holds plain LoRA "
      "adapters only (DoRA rescales the whole weight per adapter; PEFT refuses DoRA in mixed "
      "batches too); merge it into its own base instead"
    )


def same_layout(path: str, specs: Mapping[str, LoraSpec]) -> LoraSpec:
  """The first of ``specs`` (``{adapter name: spec}`` at module ``path``), after checking that
  they all split the weight alike; else a ``ValueError`` naming two that differ."""
  first_name, first = next(iter(specs.items()))
  for name, spec in specs.items():
    key = (spec.weight, spec.in_axes, spec.out_axes, spec.stacked)
    if key != (first.weight, first.in_axes, first.out_axes, first.stacked):
      raise ValueError(
        f"adapters {first_name!r} and {name!r} split {path}/{spec.weight} differently "
        f"({first.in_axes}->{first.out_axes} vs {spec.in_axes}->{spec.out_axes}): not the same "
        "model"
      )
  return first


def _check_same_base(names, trees, path: str, leaf: str) -> None:
  """Every tree must hold the same base weight (the bank keeps the first one's)."""
  ref = trees[0]
  for name, t in zip(names[1:], trees[1:], strict=True):
    a, b = ref.get(leaf), t.get(leaf)
    if a is b:
      continue
    if a is None or b is None or np.shape(a) != np.shape(b):
      have, want = (None if v is None else np.shape(v) for v in (b, a))
      raise ValueError(
        f"adapter {name!r} was made over another base: {path}/{leaf} is {have}, "
        f"{names[0]!r} has {want}"
      )
    concrete = not any(isinstance(x, jax.core.Tracer | jax.ShapeDtypeStruct) for x in (a, b))
    if concrete and not np.array_equal(np.asarray(a), np.asarray(b)):
      raise ValueError(
        f"adapter {name!r} was made over another base: {path}/{leaf} differs from "
        f"{names[0]!r}'s (a bank holds one base; PiSSA/OLoRA residual bases cannot share it)"
      )


def _pad_rank(x, axis: int, rank: int):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, rank - x.shape[axis])
  return jnp.pad(jnp.asarray(x, jnp.float32), pad)


def _slices(spec: LoraSpec | None, module: Mapping | None, layout: LoraSpec, weight_shape, rank):
  """One adapter's ``(a, b, scale)`` at a module, padded to ``rank`` (zeros if it has none)."""
  a_shape = dataclasses.replace(layout, rank=rank).a_shape(weight_shape)
  b_shape = dataclasses.replace(layout, rank=rank).b_shape(weight_shape)
  stack = tuple(weight_shape[: layout.stacked])
  if spec is None:
    zeros = jnp.zeros
    return zeros(a_shape, jnp.float32), zeros(b_shape, jnp.float32), zeros(stack, jnp.float32)
  a = _pad_rank(module[LORA_A], -1, rank)
  b = _pad_rank(module[LORA_B], layout.stacked, rank)
  return a, b, jnp.full(stack, spec.scale, jnp.float32)


def _bank_module(names, modules, base_module, path: str) -> dict:
  specs = {n: m[LORA_SPEC] for n, m in zip(names, modules, strict=True) if m is not None}
  for n, s in specs.items():
    _check_spec(n, path, s)
  layout = same_layout(path, specs)
  weight_shape = tuple(np.shape(base_module[layout.weight]))
  rank = max(s.rank for s in specs.values())
  parts = [
    _slices(specs.get(n), m, layout, weight_shape, rank)
    for n, m in zip(names, modules, strict=True)
  ]
  axis = layout.stacked  # the bank axis comes after nn.scan's layer axes
  plain = {k: v for k, v in base_module.items() if k not in (LORA_A, LORA_B, LORA_SPEC)}
  return {
    **plain,
    LORA_A: jnp.stack([p[0] for p in parts], axis),
    LORA_B: jnp.stack([p[1] for p in parts], axis),
    LORA_SCALE: jnp.stack([p[2] for p in parts], axis),
    LORA_BANK: BankSpec(
      names=tuple(names),
      rank=rank,
      weight=layout.weight,
      in_axes=layout.in_axes,
      out_axes=layout.out_axes,
      stacked=layout.stacked,
      dropout=tuple(specs[n].dropout if n in specs else 0.0 for n in names),
    ),
  }


def adapter_bank(adapted: Mapping[str, Any]):
  """One tree holding the base once and every adapter of ``adapted`` stacked on a bank axis.

  Args:
    adapted: ``{name: tree}``, each tree from :func:`lora_jax.lora_init`,
      :func:`lora_jax.load_adapter` or :func:`lora_jax.import_peft` over the same base (a
      variables dict or a bare params tree, all of one form). The mapping's order is the bank's:
      ``adapter_ids`` index it. Adapters may target different modules (one without a module
      contributes nothing there) and have different ranks, alphas and rsLoRA settings.

  Returns:
    A tree of the same form: the base with ``lora_a``, ``lora_b``, ``lora_scale`` and a static
    ``lora_bank`` at every module some adapter adapts (see the module docstring).

  Raises:
    ValueError: no adapters; a DoRA adapter; trees over different bases (a weight or another
      leaf differs); adapters that split a weight differently.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import lora_jax
    >>> model = nn.Dense(4)
    >>> base = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> fr = lora_jax.lora_init(base, lora_jax.LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> de = lora_jax.lora_init(base, lora_jax.LoraRule(".*", rank=4), rng=jax.random.key(2))
    >>> bank = lora_jax.adapter_bank({"fr": fr, "de": de})
    >>> lora_jax.bank_names(bank), bank["params"]["lora_a"].shape
    (('fr', 'de'), (2, 8, 4))
    >>> y = lora_jax.lora_apply(model.apply)(bank, jnp.ones((3, 8)), adapter_ids=[0, 1, -1])
  """
  if not adapted:
    raise ValueError("adapter_bank needs at least one adapter: {name: adapted tree}")
  names = list(adapted)
  for n in names:
    if not isinstance(n, str) or not n:
      raise ValueError(f"adapter_bank names must be non-empty strings, got {n!r}")
  split = [paths.split_params(adapted[n]) for n in names]
  trees = [t for t, _ in split]
  rebuild = split[0][1]
  found = [_adapters(t) for t in trees]
  for n, f in zip(names, found, strict=True):
    if not f:
      raise ValueError(f"adapter {n!r} carries no LoRA adapter (lora_init, load_adapter, ...)")
  banked = set().union(*found)

  for n, t in zip(names, trees, strict=True):
    if is_bank(t):
      raise ValueError(f"{n!r} is a bank itself: adapter_bank takes adapted trees, not banks")

  def build(path: str, module: dict) -> dict:
    if path not in banked:
      return module
    per = [f.get(path) for f in found]
    views = [_module_at(tr, path) for tr in trees]
    for leaf in module:
      if leaf not in (LORA_A, LORA_B, LORA_SPEC, LORA_MAGNITUDE) and not isinstance(
        module[leaf], Mapping
      ):
        _check_same_base(names, views, path, leaf)
    return _bank_module(names, per, module, path)

  return rebuild(paths.map_modules(build, trees[0]))


def _module_at(tree: Mapping, path: str) -> Mapping:
  node = tree
  for key in path.split("/")[1:]:
    node = node[key]
  return node


def bank_names(bank) -> tuple[str, ...]:
  """The adapters of ``bank`` in the order ``adapter_ids`` index them.

  Raises:
    ValueError: ``bank`` holds no bank.
  """
  tree, _ = paths.split_params(bank)
  specs = [m[LORA_BANK] for _, m in paths.iter_modules(tree) if LORA_BANK in m]
  if not specs:
    raise ValueError("this tree holds no adapter bank (lora_jax.adapter_bank makes one)")
  return specs[0].names


def is_bank(params) -> bool:
  """Whether ``params`` holds an adapter bank (from :func:`lora_jax.adapter_bank`).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import lora_jax
    >>> base = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 8)))
    >>> one = lora_jax.lora_init(base, lora_jax.LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> lora_jax.is_bank(one), lora_jax.is_bank(lora_jax.adapter_bank({"a": one}))
    (False, True)
  """
  tree, _ = paths.split_params(params)
  return any(LORA_BANK in m for _, m in paths.iter_modules(tree))


def row_ids(ids, names: tuple[str, ...], batch: int):
  """``adapter_ids`` as an int32 array ``[batch]``, checked where its values are known."""
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(
      f"adapter_ids must be a 1-D integer array (one adapter id per row), got shape "
      f"{ids.shape} dtype {ids.dtype}"
    )
  if ids.shape[0] != batch:
    raise ValueError(f"adapter_ids has {ids.shape[0]} ids for a batch of {batch} rows")
  if not isinstance(ids, jax.core.Tracer):
    bad = np.asarray(ids)[(np.asarray(ids) < -1) | (np.asarray(ids) >= len(names))]
    if bad.size:
      raise ValueError(
        f"adapter_ids holds {int(bad[0])}: ids run from -1 (the base alone) to "
        f"{len(names) - 1}; the bank's adapters: {list(names)}"
      )
  return ids.astype(jnp.int32)


def gathered(ids, a, b, scale):
  """Each row's ``A``, ``B`` and scale (zero scale for ``-1``) from a bank of one layer."""
  index = jnp.maximum(ids, 0)
  s = jnp.where(ids >= 0, jnp.take(scale, index, axis=0), 0.0)
  return jnp.take(a, index, axis=0), jnp.take(b, index, axis=0), s


def rows_matmul(x, a_rows, b_rows, s_rows, n_in: int, dtype):
  """``s * (x @ A_row) @ B_row`` per row: ``x [batch, ..., *in]`` (inputs last), ``a_rows
  [batch, *in, r]``, ``b_rows [batch, r, *out]``; returns ``[batch, ..., *out]``."""
  batch, k = x.shape[0], math.prod(x.shape[x.ndim - n_in :])
  middle = x.shape[1 : x.ndim - n_in]
  out_shape = b_rows.shape[2:]
  x3 = x.astype(dtype).reshape(batch, math.prod(middle), k)
  a3 = a_rows.astype(dtype).reshape(batch, k, a_rows.shape[-1])
  b3 = b_rows.astype(dtype).reshape(batch, b_rows.shape[1], math.prod(out_shape))
  t = jnp.einsum("bmk,bkr->bmr", x3, a3) * s_rows.astype(dtype)[:, None, None]
  y = jnp.einsum("bmr,bro->bmo", t, b3)
  return y.reshape(batch, *middle, *out_shape)


def _unpadded(a, b, stacked: int):
  """``a``, ``b`` without the rank slots that are zero in both (the bank's padding)."""
  a_np, b_np = np.asarray(a), np.asarray(b)
  used_a = np.any(a_np != 0, axis=tuple(i for i in range(a_np.ndim - 1)))
  b_rank_first = np.moveaxis(b_np, stacked, 0)
  used_b = np.any(b_rank_first != 0, axis=tuple(range(1, b_rank_first.ndim)))
  keep = np.flatnonzero(used_a | used_b)
  rank = int(keep.max()) + 1 if keep.size else 1
  return jnp.asarray(a)[..., :rank], jax.lax.slice_in_dim(jnp.asarray(b), 0, rank, axis=stacked)


def bank_adapter(bank, name: str):
  """The tree of one adapter of ``bank``, as :func:`lora_jax.lora_init` would give it.

  For :func:`lora_jax.merge`, :func:`lora_jax.export_peft` or :func:`lora_jax.save_adapter` of
  one adapter. Its rank is its own (the bank's zero padding is dropped), and its ``alpha`` is
  ``scale * rank`` (an rsLoRA adapter comes back as plain LoRA of the same scale). Modules it
  does not adapt come back without an adapter.

  Raises:
    ValueError: ``name`` is not in the bank (the message lists its adapters).
  """
  names = bank_names(bank)
  if name not in names:
    raise ValueError(f"adapter {name!r} is not in the bank; its adapters: {list(names)}")
  i = names.index(name)
  tree, rebuild = paths.split_params(bank)

  def pick(path: str, module: dict) -> dict:
    spec: BankSpec | None = module.get(LORA_BANK)
    if spec is None:
      return module
    plain = {k: v for k, v in module.items() if k not in (*BANK_LEAVES, LORA_BANK)}
    take = lambda x: jax.lax.index_in_dim(x, i, spec.stacked, keepdims=False)  # noqa: E731
    scale = np.asarray(take(module[LORA_SCALE])).reshape(-1)
    if not scale.size or not np.any(scale != 0):
      return plain  # this adapter has no module here
    a, b = _unpadded(take(module[LORA_A]), take(module[LORA_B]), spec.stacked)
    rank = a.shape[-1]
    plain[LORA_A], plain[LORA_B] = a, b
    plain[LORA_SPEC] = LoraSpec(
      rank=rank,
      alpha=float(scale[0]) * rank,
      rslora=False,
      dropout=spec.dropout[i] if spec.dropout else 0.0,
      weight=spec.weight,
      in_axes=spec.in_axes,
      out_axes=spec.out_axes,
      rule=f"bank adapter {name!r}",
      stacked=spec.stacked,
    )
    return plain

  return rebuild(paths.map_modules(pick, tree))


def base_of(bank):
  """``bank`` without its adapters: the base tree every adapter of it was made over."""
  tree, rebuild = paths.split_params(bank)

  def strip(path: str, module: dict) -> dict:
    if LORA_BANK not in module:
      return module
    return {k: v for k, v in module.items() if k not in (*BANK_LEAVES, LORA_BANK)}

  return rebuild(paths.map_modules(strip, tree))


def replace_adapter(bank, name: str, adapted, *, config=None):
  """``bank`` with adapter ``name`` replaced by the adapter of ``adapted``: a hot swap.

  The result has the bank's structure, shapes and static parts, so a jitted function that ran
  the bank runs the new one without compiling again. ``adapted`` may have another rank (up to
  the bank's padded rank at each module), alpha or rsLoRA setting, and fewer target modules
  (the bank is zero there); a module the bank does not hold cannot be added.

  ``adapted`` may also be a PEFT adapter folder (or Hub id): it is read with
  :func:`lora_jax.import_peft` onto the bank's own base (``config``: the base model's
  transformers config, as there), so loading a PEFT adapter into a running bank is one call.

  Raises:
    ValueError: ``name`` not in the bank; a rank above the bank's; a module outside the
      bank; another base; a DoRA adapter.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> import lora_jax
    >>> base = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 8)))
    >>> rule = lora_jax.LoraRule(".*", rank=2)
    >>> bank = lora_jax.adapter_bank({"fr": lora_jax.lora_init(base, rule, rng=jax.random.key(1))})
    >>> new = lora_jax.lora_init(base, rule, rng=jax.random.key(2))
    >>> swapped = lora_jax.replace_adapter(bank, "fr", new)
    >>> bool((swapped["params"]["lora_a"][0] == new["params"]["lora_a"]).all())
    True
  """
  names = bank_names(bank)
  if name not in names:
    raise ValueError(f"adapter {name!r} is not in the bank; its adapters: {list(names)}")
  if isinstance(adapted, str | os.PathLike):
    from lora_jax.peft.load import import_peft

    adapted = import_peft(adapted, base_of(bank), config=config)
  i = names.index(name)
  tree, rebuild = paths.split_params(bank)
  new_tree, _ = paths.split_params(adapted)
  found = _adapters(new_tree)
  if not found:
    raise ValueError(f"the adapter for {name!r} carries no LoRA adapter")
  outside = sorted(p for p in found if LORA_BANK not in _module_at(tree, p))
  if outside:
    raise ValueError(
      f"the adapter for {name!r} adapts {outside[:3]}, which the bank does not hold; a swap "
      "keeps the bank's modules (make a new bank to add modules)"
    )

  def swap(path: str, module: dict) -> dict:
    spec: BankSpec | None = module.get(LORA_BANK)
    if spec is None:
      return module
    own = _module_at(new_tree, path)
    for leaf, value in module.items():
      if leaf not in (*BANK_LEAVES, LORA_BANK) and not isinstance(value, Mapping):
        _check_same_base([names[0], name], [module, own], path, leaf)
    one = found.get(path)
    if one is not None:
      _check_spec(name, path, one[LORA_SPEC])
      if one[LORA_SPEC].rank > spec.rank:
        raise ValueError(
          f"the adapter for {name!r} has rank {one[LORA_SPEC].rank} at {path!r}, above the "
          f"bank's padded rank {spec.rank} there (make the bank with a higher-rank adapter)"
        )
    layout = LoraSpec(
      1, 1.0, False, 0.0, spec.weight, spec.in_axes, spec.out_axes, "", spec.stacked
    )
    weight_shape = tuple(np.shape(module[spec.weight]))
    a, b, s = _slices(None if one is None else one[LORA_SPEC], one, layout, weight_shape, spec.rank)
    put = lambda bank_leaf, x: _set_slice(bank_leaf, x, i, spec.stacked)  # noqa: E731
    return {
      **module,
      LORA_A: put(module[LORA_A], a),
      LORA_B: put(module[LORA_B], b),
      LORA_SCALE: put(module[LORA_SCALE], s),
    }

  return rebuild(paths.map_modules(swap, tree))


def _set_slice(bank_leaf, x, i: int, axis: int):
  index = (slice(None),) * axis + (i,)
  return jnp.asarray(bank_leaf).at[index].set(x.astype(bank_leaf.dtype))


def adapter_sizes(bank) -> dict[str, int]:
  """``{name: parameters}`` of each adapter of ``bank`` at its own rank (the padding not
  counted where the arrays are concrete; under ``jax.eval_shape``, at the padded rank)."""
  tree, _ = paths.split_params(bank)
  sizes: dict[str, int] = {}
  for _, module in paths.iter_modules(tree):
    spec: BankSpec | None = module.get(LORA_BANK)
    if spec is None:
      continue
    a, b = module[LORA_A], module[LORA_B]
    n_in = math.prod(a.shape[spec.stacked + 1 : -1])
    n_out = math.prod(b.shape[spec.stacked + 2 :])
    layers = math.prod(a.shape[: spec.stacked])
    for i, name in enumerate(spec.names):
      rank = spec.rank
      if not isinstance(a, jax.ShapeDtypeStruct | jax.core.Tracer):
        take = lambda x, i=i, k=spec.stacked: jax.lax.index_in_dim(x, i, k, keepdims=False)  # noqa: E731
        scale = np.asarray(take(module[LORA_SCALE]))
        rank = _unpadded(take(a), take(b), spec.stacked)[0].shape[-1] if np.any(scale) else 0
      sizes[name] = sizes.get(name, 0) + layers * rank * (n_in + n_out)
  return sizes
