"""The accelerator extras of pyproject.toml, as the README documents them."""

from __future__ import annotations

import importlib.metadata
import tomllib

import pytest
from conftest import REPO


@pytest.mark.parametrize("extra", ["cuda12", "cuda13", "tpu"])
def test_accelerator_extra_is_the_installed_jaxs_own_extra(extra):
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  assert project["optional-dependencies"][extra] == [f"jax[{extra}]"]
  assert extra in importlib.metadata.metadata("jax").get_all("Provides-Extra")
  assert f".[{extra}]" in (REPO / "README.md").read_text()
