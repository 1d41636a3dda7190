"""From an adapted tree back to a plain one: ``merge`` folds each adapter into its weight,
``unload`` drops the adapters and keeps the base weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src.spec import LORA_A
from lora_jax._src.spec import LORA_B
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import delta


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer) and not isinstance(x, jax.ShapeDtypeStruct)


def merge(params, *, check_finite: bool = True):
  """Returns ``params`` with each ``W`` replaced by ``W + scale * A @ B`` and no adapter leaves.

  The sum is formed in float32 and cast back to ``W``'s dtype, so the result is exactly the
  tree the original model's ``apply`` accepts (same structure, shapes and dtypes).

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
    spec = module.get(LORA_SPEC)
    if spec is None:
      return module
    module = dict(module)
    a, b = module.pop(LORA_A), module.pop(LORA_B)
    del module[LORA_SPEC]
    w = module[spec.weight]
    merged = (w.astype(jnp.float32) + delta(spec, a, b)).astype(w.dtype)
    if check_finite and _is_concrete(merged) and not np.isfinite(np.asarray(merged)).all():
      raise FloatingPointError(
        f"merging the adapter into {path}/{spec.weight} gave non-finite values"
      )
    module[spec.weight] = merged
    return module

  return rebuild(paths.map_modules(fold, tree))


def unload(params):
  """Returns ``params`` without adapter leaves: the base weights the adapters were added to.

  PEFT's ``unload()``: the tree the original model's ``apply`` accepts, with the weights as they
  were before :func:`lora_init` (the adapters are dropped, not merged). Other leaves, trained
  heads included, are kept as they are.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init, unload
    >>> base = nn.Dense(3).init(jax.random.key(0), jnp.ones((2, 5)))
    >>> adapted = lora_init(base, LoraRule(".*", rank=2), rng=jax.random.key(1))
    >>> plain = unload(adapted)
    >>> sorted(plain["params"]), bool((plain["params"]["kernel"] == base["params"]["kernel"]).all())
    (['bias', 'kernel'], True)
  """
  tree, rebuild = paths.split_params(params)

  def drop(path: str, module: dict) -> dict:
    if LORA_SPEC not in module:
      return module
    return {k: v for k, v in module.items() if k not in (LORA_A, LORA_B, LORA_SPEC)}

  return rebuild(paths.map_modules(drop, tree))


def has_adapters(params) -> bool:
  tree, _ = paths.split_params(params)
  return any(LORA_SPEC in m for _, m in paths.iter_modules(tree))
