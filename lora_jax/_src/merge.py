"""From an adapted tree back to a plain one: ``merge`` folds each adapter into its weight,
``unload`` drops the adapters and keeps the base weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import bank
from lora_jax._src import dora
from lora_jax._src import paths
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_MAGNITUDE
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import delta
from lora_jax.quant.kernel import materialize


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer) and not isinstance(x, jax.ShapeDtypeStruct)


def merge(params, *, check_finite: bool = True):
  """Returns ``params`` with each ``W`` replaced by ``W + scale * A @ B`` and no adapter leaves.

  A DoRA adapter (``use_dora``) gives ``m * (W + scale * A @ B) / ||W + scale * A @ B||``, the
  norm per output unit. The sum is formed in float32 and cast back to ``W``'s dtype, so the
  result is exactly the tree the original model's ``apply`` accepts (same structure, shapes and
  dtypes). Quantized weights (:func:`lora_jax.quantize`) are dequantized, adapted or not.

  Args:
    params: a variables dict or bare params tree carrying adapters from :func:`lora_init`.
    check_finite: raise if a merged weight holds NaN or inf (only checked on concrete arrays,
      not under ``jit``, where the values are not known).

  Raises:
    FloatingPointError: a merged weight is not finite; the message names the leaf.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init, merge
    >>> model = nn.Dense(3)
    >>> x = jnp.ones((2, 5))
    >>> variables = lora_init(model.init(jax.random.key(0), x), LoraRule(".*", rank=2),
    ...                       rng=jax.random.key(1))
    >>> sorted(merge(variables)["params"])
    ['bias', 'kernel']
  """
  tree, rebuild = paths.split_params(params)

  def fold(path: str, module: dict) -> dict:
    if bank.LORA_BANK in module:
      raise ValueError(
        f"{path} holds an adapter bank: merge one of its adapters, "
        "lora_jax.merge(lora_jax.bank_adapter(bank, name))"
      )
    # A quantized (QLoRA) weight is dequantized, adapted or not.
    module = {k: materialize(v) for k, v in module.items()}
    spec = module.get(LORA_SPEC)
    if spec is None:
      return module
    module = dict(module)
    a, b = module.pop(LORA_A), module.pop(LORA_B)
    del module[LORA_SPEC]
    w = module[spec.weight]
    if spec.use_dora:
      merged = dora.merged_weight(spec, w, a, b, module.pop(LORA_MAGNITUDE)).astype(w.dtype)
    else:
      merged = (w.astype(jnp.float32) + delta(spec, a, b)).astype(w.dtype)
    if check_finite and _is_concrete(merged) and not np.isfinite(np.asarray(merged)).all():
      raise FloatingPointError(
        f"merging the adapter into {path}/{spec.weight} gave non-finite values"
      )
    module[spec.weight] = merged
    return module

  return rebuild(paths.map_modules(fold, tree))


def unmerge(merged, adapted, *, check: bool = True):
  """Subtracts ``adapted``'s adapters from weights they were merged into: PEFT's ``unmerge``.

  A deployed model keeps one set of plain weights and switches tasks without reloading its
  base: unmerge task 1's adapter, merge task 2's (``merge`` of task 2's adapters placed on the
  unmerged weights, e.g. with :func:`lora_jax.combine`). Each
  weight becomes ``W - scale * A @ B`` in float32, cast back to ``W``'s dtype, so a
  ``merge``/``unmerge`` round trip costs at most one rounding of that dtype per step.

  A DoRA adapter's merge is undone as PEFT does: ``W' / (m / n) - scale * A @ B``, where
  ``n = ||W + scale * A @ B||`` is the norm the merge divided by. The merged weight cannot tell
  ``n`` (its own norms are ``|m|``), so it is computed from ``adapted``'s base weight, which must
  be the weight the adapter was merged into (PEFT caches the same norm when it merges).

  Args:
    merged: a variables dict or bare params tree without adapter leaves (:func:`merge`'s
      output, or any tree the adapters' weights were merged into).
    adapted: the tree carrying the adapters that were merged (from :func:`lora_init`, with the
      base weights they were merged into).
    check: compare each restored weight with ``adapted``'s own base weight (where ``adapted``
      holds a concrete array of that shape) and refuse a difference beyond rounding: the
      weights held another adapter, or this one was unmerged already. ``check=False``
      subtracts anyway (e.g. one of several adapters merged one after another).

  Returns:
    ``merged`` with each adapted weight restored; the same structure, shapes and dtypes.

  Raises:
    ValueError: ``adapted`` carries no adapters, an adapter's module or weight is missing
      from ``merged`` or has another shape there, or (``check``) a restored weight is not
      ``adapted``'s base weight.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    >>> from lora_jax import LoraRule, lora_init, merge, unmerge
    >>> base = nn.Dense(3).init(jax.random.key(0), jnp.ones((2, 5)))
    >>> task_1 = lora_init(base, LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> task_1["params"]["lora_b"] = jnp.ones((2, 3))  # as if trained
    >>> deployed = merge(task_1)
    >>> restored = unmerge(deployed, task_1)
    >>> bool(np.allclose(restored["params"]["kernel"], base["params"]["kernel"], atol=1e-6))
    True
  """
  tree, rebuild = paths.split_params(merged)
  adapters = {
    path: (module[LORA_SPEC], module[LORA_A], module[LORA_B], module)
    for path, module in paths.iter_modules(paths.split_params(adapted)[0])
    if LORA_SPEC in module
  }
  if not adapters:
    raise ValueError("adapted carries no LoRA adapters: nothing to unmerge")
  seen, off = set(), {}

  def subtract(path: str, module: dict) -> dict:
    if path not in adapters:
      return module
    spec, a, b, own = adapters[path]
    if LORA_SPEC in module:
      raise ValueError(f"{path} in merged still carries an adapter: unmerge takes merged weights")
    w = module.get(spec.weight)
    d = delta(spec, a, b)
    if w is None or w.shape != d.shape:
      got = "missing" if w is None else f"shape {tuple(w.shape)}"
      raise ValueError(
        f"unmerge: {path}/{spec.weight} is {got} in merged; the adapter fits {tuple(d.shape)}"
      )
    seen.add(path)
    if spec.use_dora:
      base = materialize(own.get(spec.weight))
      if base is None or isinstance(base, jax.ShapeDtypeStruct):
        raise ValueError(
          f"unmerge: the DoRA adapter at {path} needs adapted's base weight {spec.weight!r} (the "
          "norm ||W + s*A@B|| it was merged with), but adapted holds no array there"
        )
      w_new = dora.unmerged_weight(spec, w, base, a, b, own[LORA_MAGNITUDE]).astype(w.dtype)
    else:
      w_new = (w.astype(jnp.float32) - d).astype(w.dtype)
    if check:
      off[f"{path}/{spec.weight}"] = _off_base(w, w_new, materialize(own.get(spec.weight)))
    return {**module, spec.weight: w_new}

  out = paths.map_modules(subtract, tree)
  missing = sorted(set(adapters) - seen)
  if missing:
    raise ValueError(f"unmerge: merged has no module {missing[0]!r} (adapted: {sorted(adapters)})")
  bad = {p: d for p, d in sorted(off.items()) if d > 0}
  if bad:
    worst = ", ".join(f"{p} by {d:.3g}" for p, d in list(bad.items())[:3])
    raise ValueError(
      f"unmerge: after subtracting the adapter, weights differ from adapted's base weights beyond "
      f"rounding ({worst}): merged does not hold this adapter merged into that base (another "
      "adapter, or unmerged already); pass check=False to subtract anyway"
    )
  return rebuild(out)


def _off_base(merged, restored, base) -> float:
  """How far ``restored`` is from ``base`` beyond the roundings of a merge and an unmerge (the
  largest excess; <= 0 within them, or where there is no concrete base to compare)."""
  arrays = (merged, restored, base)
  if any(isinstance(x, jax.core.Tracer) or not hasattr(x, "dtype") for x in arrays):
    return 0.0  # under jit, or no base weight in adapted: nothing concrete to compare
  if np.shape(base) != np.shape(restored) or isinstance(base, jax.ShapeDtypeStruct):
    return 0.0
  m, r, w = (np.asarray(x, np.float32) for x in arrays)
  dtype = np.asarray(restored).dtype
  # a merge and an unmerge round twice in the weight's dtype; DoRA's norms add float32 error
  ulp = np.spacing(np.maximum(np.abs(w), np.abs(m)).astype(dtype)).astype(np.float32)
  tol = 4 * ulp + 1e-6 * float(np.max(np.abs(w), initial=0.0))
  excess = np.abs(r - w) - tol
  return float(np.max(np.abs(r - w))) if np.any(excess > 0) else 0.0


def unload(params):
  """Returns ``params`` without adapter leaves: the base weights the adapters were added to.

  PEFT's ``unload()``: the tree the original model's ``apply`` accepts, with the weights as they
  were before :func:`lora_init` (the adapters are dropped, not merged). Other leaves, trained
  heads included, are kept as they are. A bank (:func:`lora_jax.adapter_bank`) gives its base.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init, unload
    >>> base = nn.Dense(3).init(jax.random.key(0), jnp.ones((2, 5)))
    >>> adapted = lora_init(base, LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> plain = unload(adapted)
    >>> sorted(plain["params"]), bool((plain["params"]["kernel"] == base["params"]["kernel"]).all())
    (['bias', 'kernel'], True)
  """
  if bank.is_bank(params):
    return bank.base_of(params)
  tree, rebuild = paths.split_params(params)

  def drop(path: str, module: dict) -> dict:
    if LORA_SPEC not in module:
      return module
    return {k: v for k, v in module.items() if k not in (LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SPEC)}

  return rebuild(paths.map_modules(drop, tree))


def has_adapters(params) -> bool:
  tree, _ = paths.split_params(params)
  return any(LORA_SPEC in m for _, m in paths.iter_modules(tree))
