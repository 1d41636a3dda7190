"""The import graph: no circle anywhere, and dependencies run one way, train -> models -> core.

Every ``import`` statement of ``lora_jax/`` and ``train/`` counts, those inside functions
included: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("lora_jax", "train")
# The core: what the transform needs. It never reaches a model family or the training scripts.
CORE = ("lora_jax._src", "lora_jax.peft", "lora_jax.quant")


def modules(root: pathlib.Path, packages=PACKAGES) -> dict[str, pathlib.Path]:
  """``{dotted module name: file}`` for every ``.py`` file of ``packages`` under ``root``."""
  out = {}
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      parts = list(path.relative_to(root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      out[".".join(parts)] = path
  return out


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".") if is_package else module.split(".")[:-1]
  base = base[: len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: pathlib.Path, packages=PACKAGES) -> dict[str, set[str]]:
  """``{module: the project's modules it imports}`` (``from p import m`` counts as ``p.m``
  where ``m`` is a module, else as ``p``)."""
  known = modules(root, packages)
  graph: dict[str, set[str]] = {}
  for name, path in known.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = _absolute(name, path.name == "__init__.py", node)
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
      else:
        continue
      for target in targets:
        while target and target not in known:  # "import a.b.c" where c is a name in a.b
          target = target.rpartition(".")[0]
        if target and target != name:
          edges.add(target)
    graph[name] = edges
  return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _within(module: str, prefixes) -> bool:
  return any(module == p or module.startswith(p + ".") for p in prefixes)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
  """Imports against the direction train -> models -> core."""
  bad = []
  for module, imported in sorted(graph.items()):
    core = _within(module, CORE) or module == "lora_jax"
    for target in sorted(imported):
      if core and _within(target, ("lora_jax.models", "train")):
        bad.append(f"{module} (core) imports {target}")
      elif _within(module, ("lora_jax",)) and _within(target, ("train",)):
        bad.append(f"{module} imports {target}")
  return bad


GRAPH = import_graph(REPO)


def test_the_graph_sees_the_project():
  assert {"lora_jax", "lora_jax._src.apply", "lora_jax.models.hf.loading", "train"} <= GRAPH.keys()
  assert "lora_jax._src.spec" in GRAPH["lora_jax._src.apply"]
  assert "lora_jax.models.hf.family" in GRAPH["lora_jax.models.encoder.names"]


def test_no_import_circle():
  assert circles(GRAPH) == []


def test_dependencies_run_one_way():
  assert layering_violations(GRAPH) == []


@pytest.mark.parametrize(
  "files, expected",
  [
    ({"a/__init__.py": "", "a/x.py": "from a import y", "a/y.py": "import a.x"}, [["a.x", "a.y"]]),
    ({"a/__init__.py": "", "a/x.py": "def f():\n  from . import y", "a/y.py": "from .x import f"},
     [["a.x", "a.y"]]),
    ({"a/__init__.py": "", "a/x.py": "from a import y", "a/y.py": "import os"}, []),
  ],
)  # fmt: skip
def test_circles_are_found_in_planted_trees(tmp_path, files, expected):
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  assert circles(import_graph(tmp_path, ("a",))) == expected


def test_a_core_module_importing_a_model_family_is_refused():
  planted = {**GRAPH, "lora_jax._src.merge": GRAPH["lora_jax._src.merge"] | {"lora_jax.models"}}
  assert layering_violations(planted) == ["lora_jax._src.merge (core) imports lora_jax.models"]
