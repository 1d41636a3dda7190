"""Scanned and unscanned layouts of the same layers: ``stack_layers`` and ``unstack_layers``.

``nn.scan`` over layers stores one tree for all of them, each leaf with a leading layer axis
(``container/self_attn/q_proj/kernel [L, in, out]``); a Python loop stores one subtree per layer
(``container/0/self_attn/q_proj/kernel [in, out]``, ``container/1/...``), which is how
Hugging Face and PEFT name them. These two functions convert between the layouts, adapters
included (a stacked adapter becomes one adapter per layer and back), so a tree trained
scanned can be exported per layer and a per-layer checkpoint loaded into a scanned model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._src import paths
from lora_jax._src.spec import LoraSpec
from lora_jax.quant.array import QuantizedArray
from lora_jax.quant.array import stack as stack_quantized


def _node(tree: Mapping, container: str) -> Mapping:
  node = tree
  for key in container.split("/"):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"no {container!r} in the parameter tree (stopped at {key!r})")
    node = node[key]
  if not isinstance(node, Mapping):
    raise KeyError(f"{container!r} is a leaf, not a module of layers")
  return node


def _replace(tree: Mapping, container: str, new) -> dict:
  key, _, rest = container.partition("/")
  return {**tree, key: _replace(tree[key], rest, new) if rest else new}


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _is_leaf(x) -> bool:
  return isinstance(x, LoraSpec) or not isinstance(x, Mapping)


def _restack_spec(spec: LoraSpec, change: int) -> LoraSpec:
  return dataclasses.replace(spec, stacked=spec.stacked + change)


def is_stacked(params, container: str) -> bool:
  """Whether the tree holds layers under ``container``, stacked (no ``"0"``, ``"1"`` children)."""
  tree, _ = paths.split_params(params)
  try:
    node = _node(tree, container)
  except KeyError:
    return False
  return not any(str(k).isdigit() for k in node)


def unstack_layers(params, container: str):
  """Splits the stacked layers under ``container`` into children ``"0"``, ``"1"``, ...

  Args:
    params: a variables dict or bare params tree (arrays, numpy arrays or
      ``jax.ShapeDtypeStruct``), adapters included.
    container: the ``"a/b"`` path, relative to the params, of the scanned module, e.g.
      ``"model/layers"``.

  Returns:
    The same kind of tree with ``container/i/...`` holding layer ``i``'s slice of every leaf;
    stacked adapters become one adapter per layer.

  Raises:
    ValueError: leaves under ``container`` disagree on the number of layers.

  Example:
    >>> import numpy as np
    >>> from lora_jax import stack_layers, unstack_layers
    >>> tree = {"layers": {"dense": {"kernel": np.zeros((3, 4, 5))}}}
    >>> per_layer = unstack_layers(tree, "layers")
    >>> sorted(per_layer["layers"]), per_layer["layers"]["2"]["dense"]["kernel"].shape
    (['0', '1', '2'], (4, 5))
    >>> stack_layers(per_layer, "layers")["layers"]["dense"]["kernel"].shape
    (3, 4, 5)
  """
  tree, rebuild = paths.split_params(params)
  node = _node(tree, container)
  leaves, treedef = jax.tree.flatten(node, is_leaf=_is_leaf)
  arrays = [_shape(x) for x in leaves if x is not None and not isinstance(x, LoraSpec)]
  sizes = {s[0] for s in arrays if s}
  scalars = [s for s in arrays if not s]
  if len(sizes) != 1 or scalars:
    raise ValueError(
      f"the leaves under {container!r} do not share one leading layer axis (sizes "
      f"{sorted(sizes)}{', and scalars' if scalars else ''}); is it a scanned module?"
    )
  (n,) = sizes

  def layer(i: int):
    def take(x):
      if x is None:  # e.g. the frozen half of a partition
        return None
      if isinstance(x, LoraSpec):
        return _restack_spec(x, -1)
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
      if isinstance(x, QuantizedArray):  # every stored array has the leading layer axis
        return jax.tree.map(lambda c: c[i], x)
      return x[i]

    return jax.tree.unflatten(treedef, [take(x) for x in leaves])

  return rebuild(_replace(tree, container, {str(i): layer(i) for i in range(n)}))


def stack_layers(params, container: str):
  """Inverse of :func:`unstack_layers`: children ``"0"``, ``"1"``, ... into stacked leaves.

  Every layer must hold the same leaves with the same shapes and, where adapted, the same
  adapter settings (a scanned model runs one layer definition ``L`` times).

  Raises:
    ValueError: the children are not numbered ``0..L-1``, or two layers differ (the first
      difference is named).
  """
  tree, rebuild = paths.split_params(params)
  node = _node(tree, container)
  keys = sorted(node, key=lambda k: int(k) if str(k).isdigit() else -1)
  if not keys or [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
    raise ValueError(
      f"the children of {container!r} are {sorted(node)[:10]}, not layers numbered 0..L-1"
    )
  flat = [jax.tree.flatten(node[k], is_leaf=_is_leaf) for k in keys]
  leaves0, treedef0 = flat[0]
  for k, (leaves, treedef) in zip(keys[1:], flat[1:], strict=True):
    same = treedef == treedef0 and all(
      (a == b) if a is None or isinstance(a, LoraSpec) else _shape(a) == _shape(b)
      for a, b in zip(leaves, leaves0, strict=True)
    )
    if not same:
      raise ValueError(
        f"layer {k} of {container!r} differs from layer 0 (other leaves, shapes or adapter "
        "settings), so the layers cannot be stacked for a scanned model; use the unscanned "
        "model (scan_layers=False) for per-layer differences"
      )

  def stack(*xs):
    x = xs[0]
    if x is None:
      return None
    if isinstance(x, LoraSpec):
      return _restack_spec(x, +1)
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype)
    if isinstance(x, np.ndarray):
      return np.stack(xs)
    if isinstance(x, QuantizedArray):
      return stack_quantized(list(xs))
    return jnp.stack(xs)

  columns = zip(*(leaves for leaves, _ in flat), strict=True)
  stacked = jax.tree.unflatten(treedef0, [stack(*c) for c in columns])
  return rebuild(_replace(tree, container, stacked))
