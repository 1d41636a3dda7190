"""Adapters in flat ``{"params/a/b": leaf}`` trees: put them in, check a base fits them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lora_jax._src import paths
from lora_jax._src.paths import module_of
from lora_jax._src.spec import ADAPTER_LEAVES
from lora_jax._src.spec import LORA_SPEC
from lora_jax._src.spec import LoraSpec


def check_fits(flat: Mapping[str, Any], adapters, leaves, source: str) -> None:
  """Raises one ``ValueError`` listing every way the base tree ``flat`` does not fit.

  ``adapters``: records with ``path`` (module), ``weight`` and ``weight_shape``; ``leaves``:
  records with ``path`` and ``shape`` (adapter factors among them are skipped). A base
  adapter at a module outside ``adapters`` is a mismatch too.
  """
  problems = []
  saved_modules = {r["path"] for r in adapters}
  for record in adapters:
    weight = f"{record['path']}/{record['weight']}"
    want = tuple(record["weight_shape"])
    have = flat.get(weight)
    if have is None or isinstance(have, LoraSpec):
      problems.append(f"  {weight}: the adapter needs a weight of shape {want}, base has none")
    elif tuple(np.shape(have)) != want:
      problems.append(
        f"  {weight}: the adapter needs a weight of shape {want}, base has {np.shape(have)}"
      )
  for record in leaves:
    p, want = record["path"], tuple(record["shape"])
    if p.rsplit("/", 1)[-1] in ADAPTER_LEAVES:
      continue
    have = flat.get(p)
    if have is None or isinstance(have, LoraSpec):
      problems.append(f"  {p}: saved with shape {want}, base has no such leaf")
    elif tuple(np.shape(have)) != want:
      problems.append(f"  {p}: saved with shape {want}, base has {np.shape(have)}")
  for p, v in flat.items():
    if isinstance(v, LoraSpec) and module_of(p) not in saved_modules:
      problems.append(
        f"  {module_of(p)}: base carries an adapter the saved one lacks (merge or drop it first)"
      )
  if problems:
    raise ValueError(
      f"params do not fit the adapter in {source}; {len(problems)} mismatch(es):\n"
      + "\n".join(problems)
    )


def insert(tree: Mapping, new: Mapping[str, Any], specs: Mapping[str, LoraSpec]) -> dict:
  """A copy of ``tree`` with the flat ``new`` leaves put in place and ``specs`` added."""
  by_module: dict[str, dict[str, Any]] = {}
  for p, v in new.items():
    by_module.setdefault(module_of(p), {})[p.rsplit("/", 1)[-1]] = v

  def put(prefix: str, module: dict) -> dict:
    module.update(by_module.get(prefix, {}))
    if prefix in specs:
      module[LORA_SPEC] = specs[prefix]
    return module

  return paths.map_modules(put, tree)
