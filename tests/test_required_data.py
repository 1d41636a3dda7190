"""In CI (LORA_JAX_REQUIRE_DATA=1) a test whose data or model is missing fails; elsewhere it
skips. Checked by running one SST-2 test in a subprocess against a ../shared that does not
exist."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

TEST = "tests/test_glue_data.py::test_local_tsv_keeps_quotes_and_every_row"


def _pytest(tmp_path, require: bool) -> subprocess.CompletedProcess:
  env = {**os.environ, "LORA_JAX_SHARED": str(tmp_path / "no-shared-here")}
  env["LORA_JAX_REQUIRE_DATA"] = "1" if require else "0"
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", TEST]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_data_fails_when_required_and_skips_otherwise(tmp_path):
  required = _pytest(tmp_path, require=True)
  assert required.returncode == 1, required.stdout[-2000:]
  assert "SST-2 data not found at" in required.stdout
  assert "LORA_JAX_REQUIRE_DATA=1: missing data fails" in required.stdout
  optional = _pytest(tmp_path, require=False)
  assert optional.returncode == 0, optional.stdout[-2000:]
  assert "1 skipped" in optional.stdout
