"""The README and docs/ as the project promises them: short, every Python block a doctest, the
test command the one CI runs, and a lean library install (what lora_jax/ imports, no more).

The doctests themselves run through pytest's ``--doctest-glob`` (pyproject.toml); the site is
built by ``mkdocs build --strict`` in ``.ci/run``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

import pytest
from conftest import REPO

README = REPO / "README.md"
PAGES = sorted((REPO / "docs").rglob("*.md"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def test_readme_is_at_most_10_kb():
  assert len(README.read_bytes()) <= 10 * 1024


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(REPO)))
def test_every_python_block_is_a_doctest(path):
  blocks = FENCE.findall(path.read_text())
  for language, body in blocks:
    assert language in ("python", "bash", ""), f"{path.name}: a ```{language} block"
    if language == "python":
      assert body.lstrip().startswith(">>>"), f"{path.name}: a Python block that is no doctest"


def _commands(text: str, number: int) -> list[str]:
  """README command ``number``: its line split at ``&&``."""
  (block,) = [b for lang, b in FENCE.findall(text) if lang == "bash"][:1]
  lines = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
  return [c.strip() for c in lines[number - 1].split("&&")]


def test_readme_test_command_is_what_ci_runs():
  ci = [ln.replace(" -q ", " ") for ln in (REPO / ".ci" / "run").read_text().splitlines()]
  for command in _commands(README.read_text(), 2):
    assert command in ci, f".ci/run does not run the README's {command!r}"


def test_readme_command_1_installs_the_train_extra():
  commands = _commands(README.read_text(), 1)
  assert '.venv/bin/pip install -e ".[train]"' in commands
  assert commands[-1].endswith("train/run_glue.py --config configs/quickstart.yaml")


def _name(requirement: str) -> str:
  return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
  """``names`` and every distribution they require (no extras), as installed here."""
  seen, todo = set(), list(names)
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    try:
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    todo += [_name(r) for r in requires if "extra ==" not in r]
  return seen


def _third_party_imports(folder: str) -> set[str]:
  names = set()
  for path in (REPO / folder).rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split(".")[0])
  return {n for n in names if n not in sys.stdlib_module_names and n not in ("lora_jax", "train")}


def test_the_library_needs_only_its_own_dependencies():
  core = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
  train = {_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["train"]}
  assert not core & {"datasets", "scikit-learn", "matplotlib"}, "training packages in the core"
  assert {"datasets", "scikit-learn", "matplotlib", "pyyaml", "jinja2"} <= train
  available = _closure(core)
  providers = importlib.metadata.packages_distributions()
  optional = {"torch"}  # read_torch_file's lazy import, with an error naming the install
  for module in sorted(_third_party_imports("lora_jax") - optional):
    dists = {_name(d) for d in providers.get(module, [module])}
    assert dists & available, f"lora_jax imports {module} ({dists}), not a core dependency"
