"""Shared test setup. Must run before anything imports jax: multi-device code is tested on
eight fake CPU devices, with XLA's backend optimizations off."""

import os

# The suite compiles a few thousand small programs and runs each once or a few times, so
# compiling dominates its time: with LLVM's optimizations off (FAST_COMPILE) it takes about 40%
# less. Numerics are XLA's own either way. A test that times our programs against something
# else (the recipes against PEFT) runs them with OPTIMIZED_XLA_FLAGS: the `optimized_xla`
# fixture.
DEVICES = "--xla_force_host_platform_device_count=8"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_OURS = (DEVICES, *FAST_COMPILE.split())  # xdist's workers inherit them from the controller
_USERS = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in _OURS]
OPTIMIZED_XLA_FLAGS = " ".join([*_USERS, DEVICES])
os.environ["XLA_FLAGS"] = f"{OPTIMIZED_XLA_FLAGS} {FAST_COMPILE}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_OWN_CACHE = None  # the folder this process made (xdist's workers inherit the variable)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # One persistent compilation cache per test session (fresh, never reused across sessions,
  # removed at its end: pytest_unconfigure): runs that build the same step functions again
  # (resume, parallel modes, subprocesses) load the compiled programs instead of compiling them.
  import tempfile

  _OWN_CACHE = tempfile.mkdtemp(prefix="lora_jax_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("LORA_JAX_SHARED", REPO.parent / "shared"))
# CI sets LORA_JAX_REQUIRE_DATA=1: there, missing data or models fail the tests that need them
# instead of skipping them (a green run must have run everything).
REQUIRE_DATA = os.environ.get("LORA_JAX_REQUIRE_DATA") == "1"


# What the [test,torch] extras install (import names). In CI a test that skips because one of
# them cannot be imported fails instead: a green run must have run everything.
EXTRAS = ("torch", "peft", "gguf", "bitsandbytes", "hypothesis", "datasets", "sklearn", "yaml")


def _missing_extra(report) -> str | None:
  """The extra a skipped report's ``importorskip`` could not import, if any."""
  if not report.skipped or not isinstance(report.longrepr, tuple):
    return None
  reason = str(report.longrepr[2])
  return next((m for m in EXTRAS if f"could not import '{m}'" in reason), None)


def _fail_missing_extra(report) -> None:
  missing = _missing_extra(report) if REQUIRE_DATA else None
  if missing:
    report.outcome = "failed"
    report.longrepr = (
      f"skipped for want of {missing!r}, which the [test,torch] extras install "
      "(LORA_JAX_REQUIRE_DATA=1: a missing package fails)"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  _fail_missing_extra(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  _fail_missing_extra(outcome.get_result())


def one_device_env(**extra: str) -> dict[str, str]:
  """The environment for a process that sees one CPU device, as users' do, compiled as the
  suite's programs are (FAST_COMPILE); ``extra`` variables added."""
  return {**os.environ, "XLA_FLAGS": FAST_COMPILE, **extra}


@pytest.fixture
def optimized_xla(monkeypatch):
  """Processes this test starts compile with XLA's optimizations on, as users' runs do."""
  monkeypatch.setenv("XLA_FLAGS", OPTIMIZED_XLA_FLAGS)


def require(path: pathlib.Path, what: str, how: str) -> pathlib.Path:
  """``path`` if it exists; else skip, or fail where LORA_JAX_REQUIRE_DATA=1."""
  if not path.exists():
    message = f"{what} not found at {path}: {how}"
    if REQUIRE_DATA:
      pytest.fail(f"{message} (LORA_JAX_REQUIRE_DATA=1: missing data fails)", pytrace=False)
    pytest.skip(message)
  return path


@pytest.fixture(scope="session")
def sst2_dir() -> pathlib.Path:
  """GLUE SST-2 TSVs from ../shared (real data, no Hub)."""
  path = SHARED / "data" / "glue" / "sst2"
  require(path / "train.tsv", "SST-2 data", "it lives in ../shared beside the checkout")
  return path


@pytest.fixture(scope="session")
def minilm_path() -> pathlib.Path:
  """The real all-MiniLM-L6-v2 checkpoint (a Hugging Face BERT folder), fetched by CI."""
  path = REPO / ".cache" / "all-MiniLM-L6-v2"
  require(path / "model.safetensors", "all-MiniLM-L6-v2", "run .ci/fetch_minilm.sh first")
  return path


@pytest.fixture(scope="session")
def smollm2_path() -> pathlib.Path:
  """The real SmolLM2-135M-Instruct as a float32 Hugging Face folder, made by CI."""
  path = REPO / ".cache" / "SmolLM2-135M-Instruct"
  require(path / ".fetched", "SmolLM2-135M-Instruct", "run .ci/fetch_smollm2.sh first")
  return path


def pytest_unconfigure(config):
  """The session's compilation cache goes with it (about 160 MB after the whole suite)."""
  if _OWN_CACHE:
    import shutil

    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
