"""Canonical ``"a/b/c"`` paths over nested-dict parameter trees.

Flax keeps parameters in nested dicts. Every lora_jax function names a leaf or a module by the
``/``-joined keys leading to it, measured from the *variables* dict: a bare params tree is
addressed as if it sat under ``"params"``, so the same rule (``"params/encoder/.*/query"``)
matches whether the caller passes ``{"params": p}`` or ``p``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

PARAMS = "params"


def is_variables(tree: Any) -> bool:
  """True if ``tree`` looks like a Flax variables dict (``{"params": {...}, ...}``)."""
  return isinstance(tree, Mapping) and isinstance(tree.get(PARAMS), Mapping)


def split_params(tree: Mapping) -> tuple[Mapping, Callable[[Mapping], dict]]:
  """Returns ``(params, rebuild)``: the params subtree and a function putting one back.

  ``rebuild(new_params)`` returns a tree of the caller's shape: the variables dict with its
  ``"params"`` entry replaced (other collections untouched), or the bare params tree.
  """
  if not isinstance(tree, Mapping):
    raise TypeError(f"expected a Flax parameter tree (nested dicts), got {type(tree).__name__}")
  if is_variables(tree):
    return tree[PARAMS], lambda params: {**tree, PARAMS: params}
  return tree, lambda params: params


def join(*keys: str) -> str:
  return "/".join(k for k in keys if k)


def iter_modules(params: Mapping, prefix: str = PARAMS) -> Iterator[tuple[str, Mapping]]:
  """Yields ``(path, module_dict)`` for every dict in ``params``, parents first."""
  yield prefix, params
  for key, value in params.items():
    if isinstance(value, Mapping):
      yield from iter_modules(value, join(prefix, str(key)))


def map_modules(fn: Callable[[str, dict], dict], params: Mapping, prefix: str = PARAMS) -> dict:
  """Rebuilds ``params`` bottom-up, passing each module dict (children already mapped) to ``fn``.

  Never mutates its input: every dict on the way is a fresh copy.
  """
  out = {}
  for key, value in params.items():
    if isinstance(value, Mapping):
      out[key] = map_modules(fn, value, join(prefix, str(key)))
    else:
      out[key] = value
  return fn(prefix, out)


def tree_paths(tree: Any) -> Any:
  """A tree of the same structure as ``tree`` whose leaves are their ``"a/b/c"`` paths.

  Paths are relative to ``tree`` (no ``"params"`` prefix is added); works on any JAX pytree,
  with ``None`` subtrees (as left by :func:`lora_jax.partition`) kept as they are.
  """
  import jax

  return jax.tree_util.tree_map_with_path(lambda kp, _: keypath_str(kp), tree)


def keypath_str(keypath) -> str:
  """``jax.tree_util`` key path -> ``"a/b/c"``."""
  import jax

  parts = []
  for k in keypath:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten(tree: Mapping, prefix: str = PARAMS) -> dict[str, Any]:
  """``{"params/a/b": leaf}`` for every non-dict value (``LoraSpec`` included, ``None`` not)."""
  out = {}
  for key, value in tree.items():
    path = join(prefix, str(key))
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    elif value is not None:
      out[path] = value
  return out


def nest(flat: Mapping[str, Any]) -> dict:
  """Inverse of :func:`flatten` for paths under ``params/``: a nested dict without ``params``."""
  out: dict = {}
  for path, value in flat.items():
    *keys, leaf = path.split("/")[1:]
    node = out
    for k in keys:
      node = node.setdefault(k, {})
    node[leaf] = value
  return out


def module_of(path: str) -> str:
  return path.rsplit("/", 1)[0]
