"""lora_jax's import graph: no circle, and dependencies run one way, train -> models -> core.

Built with :mod:`test_imports`' ``import_graph`` (every ``import`` statement counts, those
inside functions included: a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import pathlib

from test_imports import _imported
from test_imports import cycles
from test_imports import import_graph
from test_imports import module_name

REPO = pathlib.Path(__file__).resolve().parent.parent
# The core: what the transform needs. It never reaches a model family or the training scripts.
CORE = ("lora_jax._src", "lora_jax.peft", "lora_jax.quant")


def _within(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def outside_imports(package_dir: pathlib.Path, package_name: str, others) -> dict[str, set[str]]:
  """``{module: the names of ``others`` (packages) it imports}``, for every module of a package."""
  out = {}
  for path in package_dir.rglob("*.py"):
    module = module_name(path, package_dir, package_name)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      names |= {
        n for n in _imported(node, module, path.name == "__init__.py") if _within(n, others)
      }
    out[module] = names
  return out


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
  """Imports of lora_jax.models from the core (``graph``: lora_jax's import graph)."""
  bad = []
  for module, imported in sorted(graph.items()):
    if _within(module, CORE) or module == "lora_jax":
      bad += [
        f"{module} (core) imports {t}" for t in sorted(imported) if _within(t, ["lora_jax.models"])
      ]
  return bad


GRAPH = import_graph(REPO / "lora_jax", "lora_jax")


def test_the_graph_sees_the_library():
  assert {"lora_jax", "lora_jax._src.apply", "lora_jax.models.hf.loading"} <= GRAPH.keys()
  assert "lora_jax._src.spec" in GRAPH["lora_jax._src.apply"]
  assert "lora_jax.models.hf.family" in GRAPH["lora_jax.models.encoder.names"]


def test_lora_jax_has_no_import_circle():
  assert cycles(GRAPH) == [], cycles(GRAPH)


def test_the_core_never_imports_a_model_family():
  assert layering_violations(GRAPH) == []


def test_a_core_module_importing_a_model_family_is_refused():
  planted = {**GRAPH, "lora_jax._src.merge": GRAPH["lora_jax._src.merge"] | {"lora_jax.models"}}
  assert layering_violations(planted) == ["lora_jax._src.merge (core) imports lora_jax.models"]


def test_the_library_never_imports_the_training_scripts(tmp_path):
  imports = outside_imports(REPO / "lora_jax", "lora_jax", ["train"])
  assert {m: n for m, n in imports.items() if n} == {}
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib" / "x.py").write_text("def f():\n  from train.engine import loop\n")
  assert outside_imports(tmp_path / "lib", "lib", ["train"]) == {"lib.x": {"train.engine.loop"}}
