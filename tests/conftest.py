"""Shared test setup. Must run before anything imports jax: multi-device code is tested on
eight fake CPU devices."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def sst2_dir() -> pathlib.Path:
  """GLUE SST-2 TSVs from ../shared (real data, no Hub)."""
  path = SHARED / "data" / "glue" / "sst2"
  if not (path / "train.tsv").exists():
    pytest.skip(f"SST-2 data not found at {path} (it lives in ../shared beside the checkout)")
  return path


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
  """The real all-MiniLM-L6-v2 checkpoint (a Hugging Face BERT folder), fetched by CI."""
  path = REPO / ".cache" / "all-MiniLM-L6-v2"
  if not (path / "model.safetensors").exists():
    pytest.skip(f"all-MiniLM-L6-v2 not found at {path}: run .ci/fetch_minilm.sh first")
  return path


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
  """The real SmolLM2-135M-Instruct as a float32 Hugging Face folder, made by CI."""
  path = REPO / ".cache" / "SmolLM2-135M-Instruct"
  if not (path / ".fetched").exists():
    pytest.skip(f"SmolLM2-135M-Instruct not found at {path}: run .ci/fetch_smollm2.sh first")
  return path
