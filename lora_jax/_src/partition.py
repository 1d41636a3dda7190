"""Which leaves train, and splitting a tree into its trainable and frozen parts.

A leaf is trainable if it is an adapter factor (``lora_a``/``lora_b``) or its ``"a/b/c"`` path
matches one of the ``extra_trainable`` regexes (``re.search``), e.g. ``"classifier"`` for a
freshly initialised head. Everything else, and every collection other than ``"params"``, is
frozen. So are the arrays of a quantized weight (:func:`lora_jax.quantize`), always.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax

from lora_jax._src import paths
from lora_jax._src.spec import ADAPTER_LEAVES
from lora_jax.quant.array import is_quantized


def compile_patterns(extra_trainable: Sequence[str]) -> tuple[re.Pattern, ...]:
  if isinstance(extra_trainable, str):
    extra_trainable = (extra_trainable,)
  out = []
  for pattern in extra_trainable:
    try:
      out.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"extra_trainable pattern {pattern!r} is not a valid regex: {e}") from None
  return tuple(out)


def _canonical(path: str, variables: bool) -> str:
  return path if variables else paths.join(paths.PARAMS, path)


def is_trainable(path: str, extra: Sequence[re.Pattern]) -> bool:
  """Whether the leaf at canonical ``path`` (``"params/..."``) trains."""
  if not path.startswith(paths.PARAMS + "/"):
    return False
  return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES or any(r.search(path) for r in extra)


def path_labels(tree, extra_trainable: Sequence[str] = (), *, check: bool = False):
  """A tree like ``tree`` whose leaves are ``True`` where the leaf trains (see module doc)."""
  extra = compile_patterns(extra_trainable)
  variables = paths.is_variables(tree)
  canon = jax.tree.map(lambda p: _canonical(p, variables), paths.tree_paths(tree))
  # The arrays of a quantized (QLoRA) weight never train: integer codes have no gradient.
  quantized = jax.tree.map(
    lambda x: jax.tree.map(lambda _: True, x) if is_quantized(x) else False,
    tree,
    is_leaf=is_quantized,
  )
  canon = jax.tree.map(lambda p, q: "" if q else p, canon, quantized)  # "": not a param path
  if check:
    leaves = [p for p in jax.tree.leaves(canon) if p.startswith(paths.PARAMS + "/")]
    for r in extra:
      if not any(r.search(p) for p in leaves):
        raise ValueError(
          f"extra_trainable pattern {r.pattern!r} matches no parameter; some paths: {leaves[:5]}"
        )
  return jax.tree.map(lambda p: is_trainable(p, extra), canon)


def trainable_mask(params, extra_trainable: Sequence[str] = ()):
  """Boolean tree: ``True`` for adapter leaves and leaves matching ``extra_trainable``.

  Args:
    params: variables dict or bare params tree (arrays or ``jax.ShapeDtypeStruct``).
    extra_trainable: regexes searched in ``"params/a/b/c"`` leaf paths; each must match
      at least one leaf.

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init, trainable_mask
    >>> v = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))
    >>> v = lora_init(v, LoraRule(".*", rank=1), rng=jax.random.key(1))
    >>> trainable_mask(v, extra_trainable=["bias"])["params"]
    {'bias': True, 'kernel': False, 'lora_a': True, 'lora_b': True, 'lora_spec': ...}
  """
  return path_labels(params, extra_trainable, check=True)


def partition(params, mask):
  """Splits ``params`` into ``(trainable, frozen)`` trees, ``None`` where a leaf is elsewhere.

  Both halves keep the full structure, so ``jax.grad`` of a function of ``trainable`` returns
  gradients only for trainable leaves and :func:`combine` puts the halves back together.
  """
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def combine(trainable, frozen):
  """Inverse of :func:`partition`: takes each leaf from whichever half holds it.

  Example:
    >>> from lora_jax import combine, partition
    >>> params = {"w": 1.0, "lora_a": 2.0}
    >>> t, f = partition(params, {"w": False, "lora_a": True})
    >>> t, f, combine(t, f) == params
    ({'lora_a': 2.0, 'w': None}, {'lora_a': None, 'w': 1.0}, True)
  """
  return jax.tree.map(
    lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
  )
