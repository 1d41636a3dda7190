"""Every program the scripts compile, lowered for GPU ("cuda") and TPU from this CPU (jax.export).

The training steps are built through the scripts' own code (``plan(args)`` of each task's
pipeline, then :func:`train.engine.lowering.export_train_step`: the same loss, optimizer,
parallel mode, shardings and first batch as a run), from the offline quickstart configs with
flags that cover each parallel mode (none, pmap, mesh with --shard_frozen), scanned and
unscanned layers, float32 and bf16, an NF4 base, DoRA and every attention implementation; then
``models.generate``'s program (prefill and the decoding loop). Each program's platform-dependent
choices are checked in the lowered text: the platform's fused kernel where one is asked for,
and never the other platform's.

jax reads the installed cuDNN's version while tracing cuDNN's attention, and this CPU has none:
a version stands in for it (``CUDNN_VERSION``), so the cuda programs hold cuDNN's kernel where a
GPU's would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import transformers
from conftest import REPO

import lora_jax
from lora_jax import models
from train.engine import lowering
from train.tasks.clm import args as clm_args
from train.tasks.clm import pipeline as clm
from train.tasks.glue import args as glue_args
from train.tasks.glue import pipeline as glue

CUDNN_VERSION = 91000  # cuDNN 9.10, what jax[cuda12] installs
TRITON, MOSAIC, CUDNN = "__gpu$xla.gpu.triton", "tpu_custom_call", "__cudnn$fmha"
BF16 = ("--dtype", "bfloat16")

# name: (script, flags on top of its quickstart config). The quickstart CLM config scans its
# layers; "--no-scan_layers" runs them unscanned.
PROGRAMS = {
  "clm-none-f32-auto": ("clm", ()),
  "clm-pmap-bf16-pallas-unscanned": (
    "clm", ("--parallel", "pmap", *BF16, "--attn_implementation", "pallas", "--no-scan_layers"),
  ),
  "clm-mesh-shard_frozen-bf16-nf4-pallas": (
    "clm", ("--parallel", "mesh", "--shard_frozen", *BF16, "--quantize", "nf4",
            "--attn_implementation", "pallas"),
  ),
  "clm-none-bf16-dora-remat-auto": (
    "clm", (*BF16, "--use_dora", "--remat", "--lora_target_modules", "all-linear"),
  ),
  "clm-none-bf16-cudnn-unscanned": (
    "clm", (*BF16, "--attn_implementation", "cudnn", "--no-scan_layers"),
  ),
  "clm-mesh-f32-xla_chunked": (
    "clm", ("--parallel", "mesh", "--attn_implementation", "xla_chunked"),
  ),
  "clm-none-f32-pallas_interpret": ("clm", ("--attn_implementation", "pallas_interpret")),
  "glue-none-f32-auto": ("glue", ()),
  "glue-pmap-bf16-pallas": (
    "glue", ("--parallel", "pmap", *BF16, "--attn_implementation", "pallas"),
  ),
  "glue-mesh-shard_frozen-bf16-nf4-pallas": (
    "glue", ("--parallel", "mesh", "--shard_frozen", *BF16, "--quantize", "nf4",
             "--attn_implementation", "pallas"),
  ),
  "glue-none-bf16-dora-auto": (
    "glue", (*BF16, "--use_dora", "--lora_target_modules", "query", "value"),
  ),
  "glue-mesh-f32-xla_chunked": (
    "glue", ("--parallel", "mesh", "--attn_implementation", "xla_chunked"),
  ),
  "glue-none-bf16-xla": ("glue", (*BF16, "--attn_implementation", "xla")),
}  # fmt: skip
SCRIPTS = {
  "clm": (clm, clm_args, "clm_quickstart.yaml", "run_clm.py"),
  "glue": (glue, glue_args, "quickstart.yaml", "run_glue.py"),
}


@pytest.fixture(autouse=True)
def cudnn_version(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo

  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: CUDNN_VERSION)


def _plan(name: str, output_dir: str):
  script, flags = PROGRAMS[name]
  pipeline, args, config, _ = SCRIPTS[script]
  argv = ["--config", str(REPO / "configs" / config), "--output_dir", output_dir,
          "--per_device_train_batch_size", "2", *flags]  # fmt: skip
  return pipeline.plan(args.parse_args(argv))


def _kernels(name: str, platform: str) -> set[str]:
  """The fused kernels the program must hold on ``platform``."""
  bf16 = "bf16" in name
  if "-pallas" in name and "pallas_interpret" not in name:
    return {TRITON if platform == "cuda" else MOSAIC}
  if platform == "cuda" and bf16 and ("-auto" in name or "-cudnn" in name):
    return {CUDNN}
  return set()


@pytest.mark.parametrize("name", [n for n in PROGRAMS if n != "clm-none-bf16-cudnn-unscanned"])
def test_the_training_step_lowers_for_gpus_and_tpus(name, tmp_path):
  """One plan per configuration (the script's setup is most of the time), lowered for each
  platform; a failure names the program and the platform."""
  script = SCRIPTS[PROGRAMS[name][0]][3]
  plan = _plan(name, str(tmp_path))
  parallel = plan.settings.parallel
  for platform in lowering.PLATFORMS:
    exported = lowering.export_train_step(plan, platform, script)
    assert exported.platforms == (platform,)
    text = exported.mlir_module()
    want = _kernels(name, platform)
    for kernel in (TRITON, MOSAIC, CUDNN):
      assert (kernel in text) == (kernel in want), (name, platform, kernel)
    devices = 1 if parallel == "none" else jax.device_count()
    assert exported.nr_devices == devices, (name, platform)
    if parallel == "mesh" and want:  # each device's rows through the kernel: not every row
      assert "sdy.manual_computation" in text, (name, platform)


def test_cudnn_lowers_for_gpus_and_is_refused_for_tpus_by_name(tmp_path):
  name = "clm-none-bf16-cudnn-unscanned"
  plan = _plan(name, str(tmp_path))
  assert CUDNN in lowering.export_train_step(plan, "cuda", "run_clm.py").mlir_module()
  with pytest.raises(lowering.LoweringFailed, match=r"^run_clm.py: the training step \(none mode\)"
                     r" does not lower for tpu: "):  # fmt: skip
    lowering.export_train_step(plan, "tpu", "run_clm.py")


@pytest.mark.parametrize("platform", lowering.PLATFORMS)
@pytest.mark.parametrize("base", ["f32", "bf16-nf4-scanned"])
def test_generation_lowers(base, platform):
  """``models.generate``'s one program (the prompts' prefill, then the decoding loop over the
  KV cache) for a model with LoRA on every linear layer, built on shapes alone."""
  config = transformers.AutoConfig.from_pretrained(REPO / "configs" / "clm_quickstart")
  bf16 = base != "f32"
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  module = models.auto_model(config, "causal-lm", dtype=dtype, scan_layers=bf16)
  ids = jnp.ones((1, 8), jnp.int32)
  variables = jax.eval_shape(module.init, jax.random.key(0), ids)
  layouts = lora_jax.kernel_layouts(module, ids)
  if bf16:
    variables = lora_jax.quantize(variables, "all-linear", layouts=layouts)
  rule = lora_jax.LoraRule("all-linear", rank=4)
  params = jax.eval_shape(
    lambda v: lora_jax.lora_init(v, rule, rng=jax.random.key(1), layouts=layouts), variables
  )
  exported = models.export_generate(
    platform, module, params, [[2, 5, 9, 11], [2, 7]], max_new_tokens=6, eos_token_id=3
  )
  assert exported.platforms == (platform,)
  text = exported.mlir_module()
  assert "stablehlo.while" in text  # the decoding loop
  assert TRITON not in text and MOSAIC not in text  # with a cache: XLA's or cuDNN's attention
