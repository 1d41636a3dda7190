"""``param_report``: how many parameters train, in PEFT's words, and where they are."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax

from lora_jax._src import paths
from lora_jax._src.partition import compile_patterns
from lora_jax._src.partition import is_trainable
from lora_jax._src.spec import LORA_SPEC


def _size(leaf) -> int:
  return math.prod(getattr(leaf, "shape", ()))


def count_params(params, extra_trainable: Sequence[str] = ()) -> tuple[int, int]:
  """``(trainable, total)`` parameter counts of the ``"params"`` collection."""
  tree, _ = paths.split_params(params)
  extra = compile_patterns(extra_trainable)
  total = trainable = 0
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
    path = paths.join(paths.PARAMS, paths.keypath_str(keypath))
    n = _size(leaf)
    total += n
    trainable += n if is_trainable(path, extra) else 0
  return trainable, total


def summary_line(trainable: int, total: int) -> str:
  """PEFT's ``print_trainable_parameters`` line."""
  pct = 100.0 * trainable / total if total else 0.0
  return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


def param_report(params, extra_trainable: Sequence[str] = ()) -> str:
  """A summary line in PEFT's format, then one row per module that holds parameters.

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
  tree, _ = paths.split_params(params)
  extra = compile_patterns(extra_trainable)
  rows = []
  for path, module in paths.iter_modules(tree):
    own = [(k, v) for k, v in module.items() if not isinstance(v, dict) and k != LORA_SPEC]
    if not own:
      continue
    n = sum(_size(v) for _, v in own)
    t = sum(_size(v) for k, v in own if is_trainable(paths.join(path, k), extra))
    spec = module.get(LORA_SPEC)
    adapter = f"r={spec.rank} alpha={spec.alpha} scale={spec.scale:g}" if spec else ""
    rows.append((path, f"{n:,}", f"{t:,}", adapter))
  trainable, total = count_params(params, extra_trainable)
  header = ("module", "params", "trainable", "adapter")
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
  lines = [summary_line(trainable, total)]
  for r in [header, *rows]:
    cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]), r[3]]
    lines.append("  ".join(cells).rstrip())
  return "\n".join(lines)
