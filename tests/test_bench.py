"""Smoke test of the training-step benchmark (``bench/train_step.py``): it runs, and its rows
are complete and sane. No timing assertions: the figures belong to docs/benchmarks.md."""

import doctest
import importlib.util
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import transformers
from conftest import REPO
from conftest import one_device_env

sys.path.insert(0, str(REPO))

from bench import clm_recipe  # noqa: E402
from bench import configs  # noqa: E402
from bench import flops  # noqa: E402
from bench import report  # noqa: E402
from lora_jax.models import auto_model  # noqa: E402

HAS_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft"))
SMALLEST = "tiny-64x8"


def _run(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), *args]
  return subprocess.run(
    cmd, cwd=REPO, env=one_device_env(), capture_output=True, text=True, timeout=120
  )


def _smoke(out, *extra: str) -> tuple[str, list[dict], str]:
  args = ["--configs", SMALLEST, "--steps", "2", "--warmup", "1", "--out", str(out), *extra]
  proc = _run(*args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
  return proc.stdout, lines, (out / "results.md").read_text()


PEFT_SIDE = ("--peft", "--peft_impl", "eager") if HAS_PEFT else ()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """One benchmark run for the tests below (each run ~15 s on CPU): with the PEFT side where
  torch and peft are installed."""
  return _smoke(tmp_path_factory.mktemp("bench"), *PEFT_SIDE)


def _check_row(r: dict) -> None:
  assert "error" not in r, r
  assert r["config"] == SMALLEST and r["tokens"] == 64 * 8
  assert r["steps"] == 2 and r["hidden_dropout"] == 0.1
  assert r["step_ms"] > 0 and r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
  assert r["tokens_per_s"] > 0 and r["compile_s"] >= 0 and r["peak_mem_gib"] > 0
  assert 0 < r["params_trainable"] < r["params_total"]
  assert r["model_flops"] == flops.model_flops(configs.CONFIGS[SMALLEST])
  assert math.isfinite(r["final_loss"]) and r["mfu"] is None  # no --peak_tflops given


def test_rows_have_sane_fields(smoke):
  _, lines, _ = smoke
  head, rows = lines[0], lines[1:]
  assert "train_step.py" in head["command"] and head["date"].startswith("20")
  assert [r["side"] for r in rows] == ["lora_jax"] + (["peft"] if PEFT_SIDE else [])
  _check_row(rows[0])
  # XLA's count of the compiled step agrees with the 4NT + attention model (not a timing)
  assert 0.8 < rows[0]["xla_over_model_flops"] < 1.3, rows[0]
  assert rows[0]["xla_step_gib"] > 0


@pytest.mark.skipif(not HAS_PEFT, reason="PEFT side of the smoke test needs torch and peft")
def test_peft_side(smoke):
  _, lines, _ = smoke
  jax_row, peft_row = lines[1:]
  assert (jax_row["side"], peft_row["side"], peft_row["impl"]) == ("lora_jax", "peft", "eager")
  _check_row(peft_row)
  assert jax_row["params_trainable"] == peft_row["params_trainable"]  # same adapters + head
  assert jax_row["speed_vs_peft_eager"] > 0 and jax_row["mem_vs_peft_eager"] > 0


def test_markdown_table(smoke):
  stdout, _, md = smoke
  assert "| config | side |" in md and f"| {SMALLEST} | lora_jax | jit |" in md
  assert md.strip().splitlines()[-1] in stdout


def test_unknown_configuration_lists_the_valid_ones():
  with pytest.raises(ValueError, match="roberta-large-512x16-all"):
    configs.resolve("roberta-huge-128x32")
  proc = _run("--configs", "nope")
  assert proc.returncode == 2 and "unknown configuration 'nope'" in proc.stderr
  assert "tiny-64x8" in proc.stderr


def test_groups_and_help_name_every_configuration():
  assert [c.name for c in configs.resolve("cpu,tiny-64x8")] == list(configs.GROUPS["cpu"])
  text = configs.help_text()
  assert all(name in text for name in configs.CONFIGS)


@pytest.mark.parametrize("name", ["tiny-64x8", "mini-128x16-all"])
def test_matmul_params_match_the_flax_model(name):
  cfg = configs.CONFIGS[name]
  opts = {"hidden_act": "gelu", "hidden_dropout": 0.1, "attn_dropout": 0.0}
  hf = transformers.RobertaConfig.from_dict(configs.hf_config(cfg, opts))
  model = auto_model(hf, "sequence-classification")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  kernels = [
    x.size
    for path, x in jax.tree_util.tree_leaves_with_path(shapes)
    if getattr(path[-1], "key", None) == "kernel"
  ]
  assert flops.matmul_params(cfg) == sum(kernels)


def test_full_fine_tuning_counts_the_weight_gradient():
  lora, full = configs.CONFIGS["mini-128x16"], configs.CONFIGS["mini-128x16-full"]
  diff = flops.model_flops(full) - flops.model_flops(lora)
  assert diff == 2 * flops.matmul_params(lora) * lora.tokens


def test_ratios_and_table_tolerate_errors():
  rows = [
    {"side": "lora_jax", "config": "c", "impl": "jit", "tokens_per_s": 20.0, "step_ms_min": 1.0,
     "peak_mem_gib": 1.0, "mem_source": "process RSS, timed steps", "rss_base_gib": 0.5},
    {"side": "peft", "config": "c", "impl": "eager", "tokens_per_s": 10.0, "step_ms_min": 2.0,
     "peak_mem_gib": 2.0, "mem_source": "process RSS, timed steps", "rss_base_gib": 0.5},
    {"side": "peft", "config": "c", "impl": "torch.compile", "error": "RuntimeError: x | y"},
  ]  # fmt: skip
  out = report.add_ratios(rows)[0]
  assert out["speed_vs_peft_eager"] == 2.0 and out["speed_vs_peft_eager_min"] == 2.0
  assert out["mem_vs_peft_eager"] == 0.5 and out["mem_over_base_vs_peft_eager"] == pytest.approx(
    1 / 3, abs=1e-3
  )
  assert "speed_vs_peft_compile" not in out
  assert "error: RuntimeError: x / y" in report.markdown(rows)


@pytest.mark.parametrize("module", [configs, flops, clm_recipe])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0


def test_clm_recipe_steady_s_per_step_leaves_out_each_shapes_first_step():
  steady_s_per_step = clm_recipe.steady_s_per_step
  shapes = [[4, 96], [4, 96], [4, 128], [4, 128], [4, 96], [4, 128], [4, 128]]
  # 96: 2.0 and 2.6 (median 2.3), 128: 3.0, 3.5 and 40.0, one disturbed step (median 3.5)
  assert steady_s_per_step([9.0, 2.0, 8.0, 3.0, 2.6, 3.5, 40.0], shapes) == pytest.approx(
    (2 * 2.3 + 3 * 3.5) / 5
  )
  assert steady_s_per_step([9.0, 2.0, 8.0, 3.0, 2.6, 3.5, 40.0], shapes, min) == pytest.approx(
    (2 * 2.0 + 3 * 3.0) / 5
  )
  with pytest.raises(ValueError, match="4 step times for 7 batch shapes"):
    steady_s_per_step([1.0] * 4, shapes)
  with pytest.raises(ValueError, match="no batch shape repeats"):
    steady_s_per_step([1.0, 2.0], [[4, 96], [4, 128]])
