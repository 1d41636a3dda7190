"""The training-step benchmark's causal-LM configurations (``bench/llm_*.py``): both sides
compute the same loss on the same packed or padded batch, the smallest configuration runs
beside PEFT (slow: a subprocess run of the benchmark), and the memory script plans a step from
shapes. No timing assertions."""

import doctest
import importlib.util
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO))

from bench import configs  # noqa: E402
from bench import flops  # noqa: E402
from bench import llm_batch  # noqa: E402
from bench import llm_jax  # noqa: E402
from bench import llm_memory  # noqa: E402

HAS_PEFT = all(importlib.util.find_spec(m) for m in ("torch", "peft"))
SMALLEST = "llama-tiny-64x4-packed"


@pytest.mark.parametrize("kind", configs.BATCH_KINDS)
def test_both_sides_compute_the_same_loss(kind):
  """transformers + PEFT (packed rows as restarting position_ids) and lora_jax (segment ids)
  give the same loss on the same weights and batch: same targets, same attention."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  import transformers
  from llm import randomize

  from bench import llm_peft
  from lora_jax.models import hf_to_flax

  cfg = configs.CONFIGS[f"llama-tiny-64x4-{kind}"]
  hf = configs.hf_config(cfg, {})
  model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(hf)))
  inputs = llm_peft.model_inputs(cfg, 0, torch.device("cpu"))
  with torch.no_grad():
    theirs = model(**inputs).loss.item()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  module = llm_jax.make_module(hf, dtype=jnp.float32, scan=False)
  base = {"params": hf_to_flax(state, transformers.LlamaConfig.from_dict(hf))}
  trainable, frozen, tx = llm_jax.adapt(base, llm_jax.layouts(module), cfg, key=jax.random.key(0))
  batch = llm_jax.host_batch(cfg, 0)
  # the fused cross-entropy (by default, and in chunks of 16 positions) and whole logits; the
  # other chunkings on one batch kind only (a compiled step each; they read the same targets)
  for chunk in (llm_jax.LOSS_CHUNK, 16, 0) if kind == "packed" else (llm_jax.LOSS_CHUNK,):
    step = jax.jit(llm_jax.make_step(module, tx, loss_chunk=chunk))
    ours = float(step(trainable, tx.init(trainable), frozen, batch, 0)[2])  # B = 0: the base
    assert ours == pytest.approx(theirs, rel=2e-5), (chunk, ours, theirs)


def test_batches_keep_their_shape_and_targets():
  for kind in configs.BATCH_KINDS:
    b = llm_batch.make_batch(64, 4, 256, kind, seed=3)
    seg = b["segment_ids"]
    assert all(v.shape == (4, 64) for v in b.values())
    assert (seg > 0).all() if kind == "packed" else ((seg == 0).any() and (seg <= 1).all())
    # a target is the next token of the same sequence, and only that
    same = np.pad((seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), ((0, 0), (0, 1)))
    assert (b["target_weights"] == same).all()
    assert (b["target_ids"][:, :-1] == b["input_ids"][:, 1:]).all()


def test_llm_configurations_count_their_matmul_weights():
  """flops.matmul_params of each LLM shape equals the kernels of its Flax model (lm_head or
  the tied embedding counted once)."""
  for name in ("llama-tiny-64x4-packed", "smollm2-135m-256x4-packed", "llama-7b-2048x1-padded"):
    cfg = configs.CONFIGS[name]
    module = llm_jax.make_module(configs.hf_config(cfg, {}), dtype=jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 1), jnp.int32))
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    kernels = sum(x.size for p, x in leaves if getattr(p[-1], "key", None) == "kernel")
    head = cfg.model.hidden * cfg.model.vocab if cfg.model.tied else 0
    assert flops.matmul_params(cfg) == kernels + head, name


def _train_step(*args: str) -> subprocess.CompletedProcess:
  cmd = [sys.executable, str(REPO / "bench" / "train_step.py"), *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a subprocess run of the benchmark beside PEFT: .ci/run runs it
def test_smallest_llm_configuration_runs_two_steps_beside_peft(tmp_path):
  extra = ["--peft", "--peft_impl", "eager"] if HAS_PEFT else []
  proc = _train_step("--configs", SMALLEST, "--steps", "2", "--warmup", "1",
                     "--out", str(tmp_path), *extra)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(ln) for ln in (tmp_path / "results.jsonl").read_text().splitlines()[1:]]
  assert [r["side"] for r in rows] == ["lora_jax", "peft"][: len(rows)] and rows
  cfg = configs.CONFIGS[SMALLEST]
  for r in rows:
    assert "error" not in r, r
    assert r["tokens"] == cfg.tokens and r["batch_kind"] == "packed" and r["steps"] == 2
    assert r["model_flops"] == flops.model_flops(cfg) and r["step_ms"] > 0
    # random weights: a loss near log(vocab), whatever the side
    assert math.isfinite(r["final_loss"]) and abs(r["final_loss"] - math.log(256)) < 0.2, r
  if HAS_PEFT:  # same adapters: r=16 on the seven linears of both layers
    assert (
      rows[0]["params_trainable"]
      == rows[1]["params_trainable"]
      == 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    )
  assert rows[0]["xla_flops"] is None  # scanned layers: XLA counts the loop body once


def test_memory_plan_from_shapes():
  """The compiled step's plan for the tiny configuration: the arguments are the frozen base,
  the adapters and AdamW's moments; the donated adapters and moments alias the outputs."""
  row = llm_memory.plan(SMALLEST, "bf16")
  lora = row["lora_params"]
  assert lora == 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
  assert row["argument_bytes"] >= row["base_bytes"] + 3 * 4 * lora
  assert row["alias_bytes"] >= 3 * 4 * lora and row["temp_bytes"] > 0
  assert row["peak_bytes"] == (
    row["argument_bytes"] + row["output_bytes"] - row["alias_bytes"] + row["temp_bytes"]
  )
  with pytest.raises(ValueError, match="unknown base 'fp8'; valid: bf16, nf4"):
    llm_memory.plan(SMALLEST, "fp8")


@pytest.mark.parametrize("module", [llm_batch, llm_memory])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0
