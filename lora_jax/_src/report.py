"""``param_report``: how many parameters train, in PEFT's words, and where they are."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from lora_jax._src import bank as bank_lib
from lora_jax._src import paths
from lora_jax._src.partition import compile_patterns
from lora_jax._src.partition import is_trainable
from lora_jax._src.spec import LORA_SPEC
from lora_jax.nnx import tree as nnx_tree
from lora_jax.quant.array import is_quantized


def _size(leaf) -> int:
  return math.prod(getattr(leaf, "shape", ()))


def count_params(params, extra_trainable: Sequence[str] = ()) -> tuple[int, int]:
  """``(trainable, total)`` parameter counts of the ``"params"`` collection."""
  tree, _ = paths.split_params(nnx_tree.as_variables(params))
  extra = compile_patterns(extra_trainable)
  total = trainable = 0
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_quantized):
    path = paths.join(paths.PARAMS, paths.keypath_str(keypath))
    n = _size(leaf)  # a quantized weight counts the parameters it stands for
    total += n
    trainable += n if is_trainable(path, extra) and not is_quantized(leaf) else 0
  return trainable, total


def _bytes(leaf) -> int:
  if is_quantized(leaf):
    return leaf.nbytes
  return _size(leaf) * np.dtype(getattr(leaf, "dtype", np.float32)).itemsize


def quantized_line(params) -> str | None:
  """Parameters held quantized (:func:`lora_jax.quantize`) and bytes, or ``None`` if none."""
  tree, _ = paths.split_params(params)
  leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
  quantized = [x for x in leaves if is_quantized(x)]
  if not quantized:
    return None
  kinds = ", ".join(sorted({q.describe() for q in quantized}))
  plain = sum(q.size * q.dtype.itemsize for q in quantized)
  stored = sum(q.nbytes for q in quantized)
  total = sum(_bytes(x) for x in leaves)
  return (
    f"quantized params: {sum(q.size for q in quantized):,} ({kinds}) in {stored:,} bytes, "
    f"{plain:,} unquantized || all params: {total:,} bytes"
  )


def summary_line(trainable: int, total: int) -> str:
  """PEFT's ``print_trainable_parameters`` line."""
  pct = 100.0 * trainable / total if total else 0.0
  return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


def param_report(params, extra_trainable: Sequence[str] = ()) -> str:
  """A summary line in PEFT's format, then one row per module that holds parameters.

  A quantized weight (:func:`lora_jax.quantize`) counts the parameters it stands for (frozen);
  a second line then gives the quantized parameters and the bytes they and the whole tree take.

  Works on arrays and on ``jax.eval_shape`` output alike (it reads only shapes).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> from lora_jax import LoraRule, lora_init, param_report
    >>> v = nn.Dense(10).init(jax.random.key(0), jnp.ones((1, 100)))
    >>> v = lora_init(v, LoraRule(".*", rank=4), rng=jax.random.key(1))
    >>> print(param_report(v))
    trainable params: 440 || all params: 1,450 || trainable%: 30.3448
    module  params  trainable  adapter
    params   1,450        440  r=4 alpha=4.0 scale=1
  """
  params = nnx_tree.as_variables(params)
  tree, _ = paths.split_params(params)
  extra = compile_patterns(extra_trainable)
  rows = []
  for path, module in paths.iter_modules(tree):
    own = [
      (k, v)
      for k, v in module.items()
      if not isinstance(v, dict) and k not in (LORA_SPEC, bank_lib.LORA_BANK)
    ]
    if not own:
      continue
    n = sum(_size(v) for _, v in own)
    t = sum(
      _size(v) for k, v in own if is_trainable(paths.join(path, k), extra) and not is_quantized(v)
    )
    spec = module.get(LORA_SPEC)
    adapter = f"r={spec.rank} alpha={spec.alpha} scale={spec.scale:g}" if spec else ""
    adapter += " dora" if spec and spec.use_dora else ""
    adapter += "".join(f" {k}: {v.describe()}" for k, v in own if is_quantized(v))
    bank = module.get(bank_lib.LORA_BANK)
    adapter += f"bank of {len(bank.names)}, r<={bank.rank}" if bank else ""
    rows.append((path, f"{n:,}", f"{t:,}", adapter.strip()))
  trainable, total = count_params(params, extra_trainable)
  header = ("module", "params", "trainable", "adapter")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
  lines = [summary_line(trainable, total)]
  quantized = quantized_line(params)
  if quantized is not None:  # QLoRA: how much the quantized base takes
    lines.append(quantized)
  if bank_lib.is_bank(params):  # an adapter bank: each adapter's own count, PEFT's line
    flat = paths.flatten(paths.split_params(params)[0])
    scales = sum(_size(v) for p, v in flat.items() if p.endswith("/" + bank_lib.LORA_SCALE))
    for name, n in bank_lib.adapter_sizes(params).items():  # as if it were alone on the base
      lines.append(f"adapter {name!r}: {summary_line(n, total - trainable - scales + n)}")
  for r in [header, *rows]:
    cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3]]
    lines.append("  ".join(cells).rstrip())
  return "\n".join(lines)
