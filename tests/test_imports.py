"""The packages' import graphs: no module imports, directly or around a circle, one that imports it.

:func:`import_graph` reads every module of a package (``ast``, nothing is imported) and lists the
package's modules each one imports, at the top or inside a function; :func:`cycles` finds every
circle in such a graph. Both are generic: any package can be checked the same way.
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent


def module_name(path: pathlib.Path, package_dir: pathlib.Path, package_name: str) -> str:
  """``train/engine/loop.py`` -> ``train.engine.loop``; ``train/data/__init__.py`` ->
  ``train.data``."""
  parts = list(path.relative_to(package_dir).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join([package_name, *parts])


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
  """The dotted names an ``import`` / ``from ... import`` statement in ``module`` names: for
  ``from a import b``, ``a.b`` (:func:`import_graph` falls back to ``a`` when ``b`` is a name in
  ``a`` rather than a module)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if not isinstance(node, ast.ImportFrom):
    return []
  if node.level:  # relative: from the module's package, one level up per extra dot
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    source = ".".join(base + ([node.module] if node.module else []))
  else:
    source = node.module or ""
  return [f"{source}.{alias.name}" for alias in node.names]


def import_graph(package_dir: str | pathlib.Path, package_name: str) -> dict[str, set[str]]:
  """``module -> the package's modules it imports`` for every ``.py`` file under
  ``package_dir`` (the folder of the package ``package_name``).

  An import of ``a.b.c`` counts as an import of ``a.b.c`` if that is a module of the package,
  else of the longest of its prefixes that is one (``from train.engine.loop import fit``:
  ``train.engine.loop``). Importing a submodule runs its packages' ``__init__`` first, but those
  are not edges here: a package's ``__init__`` importing its submodules would otherwise make
  every submodule import it back.
  """
  package_dir = pathlib.Path(package_dir)
  files = {module_name(p, package_dir, package_name): p for p in package_dir.rglob("*.py")}
  graph: dict[str, set[str]] = {}
  for module, path in files.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    edges = set()
    for node in ast.walk(tree):
      for name in _imported(node, module, path.name == "__init__.py"):
        parts = name.split(".")
        while parts and ".".join(parts) not in files:
          parts.pop()
        if parts and ".".join(parts) != module:
          edges.add(".".join(parts))
    graph[module] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of ``graph`` with more than one module (or a module
  importing itself), each sorted: every import circle lies within one of them (Tarjan's).

  Example:
    >>> cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    [['a', 'b', 'c']]
    >>> cycles({"a": {"b"}, "b": set()})
    []
  """
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found: list[list[str]] = []

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
      if len(component) > 1 or v in graph.get(v, ()):
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)


def test_the_graph_sees_absolute_relative_and_function_level_imports(tmp_path):
  pkg = tmp_path / "pkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("from . import b\n")
  (pkg / "a.py").write_text("import os\nfrom pkg.sub.b import thing\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from ..a import x\n  from . import c\n")
  (pkg / "sub" / "c.py").write_text("import pkg.sub\n")
  graph = import_graph(pkg, "pkg")
  assert graph == {
    "pkg": set(),
    "pkg.a": {"pkg.sub.b"},
    "pkg.sub": {"pkg.sub.b"},
    "pkg.sub.b": {"pkg.a", "pkg.sub.c"},
    "pkg.sub.c": {"pkg.sub"},
  }
  # a -> sub.b -> a, and sub -> sub.b -> sub.c -> sub: one component
  assert cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.sub.c"]]
  assert cycles({**graph, "pkg.sub.b": {"pkg.sub.c"}}) == [["pkg.sub", "pkg.sub.b", "pkg.sub.c"]]


def test_train_has_no_import_circle():
  graph = import_graph(REPO / "train", "train")
  assert "train.engine.loop" in graph and "train.tasks.clm.pipeline" in graph
  assert cycles(graph) == [], cycles(graph)


def test_the_engine_and_data_know_no_task_and_no_command_line():
  """Dependencies run one way: cli and tasks -> engine and data; never back."""
  graph = import_graph(REPO / "train", "train")
  for module, imports in graph.items():
    if module.startswith(("train.engine", "train.data")):
      bad = {m for m in imports if m.startswith(("train.tasks", "train.cli", "train.run_"))}
      assert not bad, f"{module} imports {sorted(bad)}"
