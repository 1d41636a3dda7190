"""The LoRA API on decoders, scanned or not: reports, adapter files, PEFT both ways, export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from llm import adapted
from llm import config
from llm import max_error
from llm import mixed_batch
from llm import save_checkpoint
from llm import torch_logits

import lora_jax
from lora_jax.models import auto_model
from lora_jax.models import from_pretrained

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")
LLAMA_2_7B = transformers.LlamaConfig(
  vocab_size=32000,
  hidden_size=4096,
  intermediate_size=11008,
  num_hidden_layers=32,
  num_attention_heads=32,
  num_key_value_heads=32,
)


def _checkpoint(name, tmp_path_factory):
  # gain 0.6: logits of a few units, so that float32 rounding (not an amplifying, saturated
  # random model) decides how close two correct implementations come
  return save_checkpoint(config(name), tmp_path_factory.mktemp(name), gain=0.6)


@pytest.fixture(scope="module", params=["llama-tied-bias-llama3", "qwen3-qknorm"])
def ckpt(request, tmp_path_factory):
  """Two families: tied embeddings, biases and llama3 RoPE; untied head and q/k norm."""
  return _checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
  return _checkpoint("qwen3-qknorm", tmp_path_factory)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_llama_2_7b_param_report_without_allocating(scan):
  module = auto_model(LLAMA_2_7B, scan_layers=scan)
  ids = jnp.ones((1, 1), jnp.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids)
  layouts = lora_jax.kernel_layouts(module, ids)
  rule = lora_jax.LoraRule(["q_proj", "v_proj"], rank=8)
  adapted = lora_jax.lora_init(shapes, rule, rng=jax.random.key(0), layouts=layouts)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(adapted))
  first = lora_jax.param_report(adapted).splitlines()[0]
  # PEFT's print_trainable_parameters for meta-llama/Llama-2-7b-hf, r=8 on q_proj, v_proj
  assert first == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"


def test_stacked_adapters_save_and_load(qwen3, tmp_path):
  module, variables = from_pretrained(qwen3.folder, scan_layers=True)
  rule = lora_jax.LoraRule("all-linear", rank=4, alpha=8)
  params = adapted(module, variables, rule)
  lora_jax.save_adapter(tmp_path / "a", params)
  info = lora_jax.adapter_info(tmp_path / "a")
  q = next(r for r in info["adapters"] if r["path"].endswith("self_attn/q_proj"))
  kernel = variables["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q["stacked"] == 1 and q["weight_shape"] == list(kernel.shape) and kernel.ndim == 3
  loaded = lora_jax.load_adapter(tmp_path / "a", variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  # an unscanned base does not fit a stacked adapter: every adapter is named
  _, loop_vars = from_pretrained(qwen3.folder)
  with pytest.raises(ValueError, match="mismatch"):
    lora_jax.load_adapter(tmp_path / "a", loop_vars)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_exported_adapter_gives_our_logits_in_peft(ckpt, scan, tmp_path):
  module, variables = from_pretrained(ckpt.folder, scan_layers=scan)
  rule = lora_jax.LoraRule("all-linear", rank=4, alpha=8)
  params = adapted(module, variables, rule)
  ids, mask = mixed_batch(ckpt.config)
  ours = lora_jax.lora_apply(module.apply)(params, ids, mask)
  assert max_error(ours, module.apply(variables, ids, mask), mask) > 0.1
  folder = lora_jax.export_peft(
    tmp_path, params, base_model_name_or_path="x", config=ckpt.config, task_type="CAUSAL_LM"
  )
  names = sorted(peft.utils.load_peft_weights(str(folder)))
  assert "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight" in names
  assert len(names) == 3 * 7 * 2  # one pair per layer and projection: no lm_head
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.folder).eval()
  peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
  assert max_error(ours, torch_logits(peft_model, ids, mask), mask) <= 1e-4


def test_an_adapted_embedding_gives_our_logits_in_peft_tied_or_not(ckpt, tmp_path):
  """A tied embedding's adapter changes the output layer too (its attend); PEFT does that only
  with ``ensure_weight_tying``, which the export sets for such adapters."""
  module, variables = from_pretrained(ckpt.folder)
  params = adapted(module, variables, lora_jax.LoraRule(["embed_tokens", "q_proj"], rank=4))
  ids, mask = mixed_batch(ckpt.config)
  ours = lora_jax.lora_apply(module.apply)(params, ids, mask)
  folder = lora_jax.export_peft(
    tmp_path, params, base_model_name_or_path="x", config=ckpt.config, task_type="CAUSAL_LM"
  )
  tied = ckpt.config.tie_word_embeddings
  assert json.loads((folder / "adapter_config.json").read_text())["ensure_weight_tying"] is tied
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.folder).eval()
  peft_model = peft.PeftModel.from_pretrained(torch_model, folder).eval()
  assert max_error(ours, torch_logits(peft_model, ids, mask), mask) <= 1e-4
  back = lora_jax.import_peft(folder, variables, config=ckpt.config)  # and back, one adapter
  assert max_error(ours, lora_jax.lora_apply(module.apply)(back, ids, mask), mask) <= 1e-5
  if tied:  # an output adapter of its own is not the tied embedding's
    tensors = peft.utils.load_peft_weights(str(folder))
    tensors["base_model.model.lm_head.lora_B.weight"] *= 2
    safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="the tied output layer 'lm_head' has an adapter of its"):
      lora_jax.import_peft(folder, variables, config=ckpt.config)
    # PEFT's own adapter on the tied embedding, without ensure_weight_tying: input only
    del tensors["base_model.model.lm_head.lora_A.weight"]
    del tensors["base_model.model.lm_head.lora_B.weight"]
    safetensors_torch.save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
      json.dumps({**config, "ensure_weight_tying": False})
    )
    with pytest.warns(UserWarning, match="adapts the tied embedding without ensure_weight_tying"):
      lora_jax.import_peft(folder, variables, config=ckpt.config)


def test_a_peft_made_embedding_adapter_imports_to_peft_logits(ckpt, tmp_path):
  """PEFT saves the embedding layers it adapts (``base_layer.weight``; ``lm_head``'s too when
  tied), which ``import_peft`` refused as leaves the base lacks."""
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt.folder).eval()
  tied = ckpt.config.tie_word_embeddings
  peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                ensure_weight_tying=tied)  # fmt: skip
  peft_model = peft.get_peft_model(torch_model, peft_config)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name or "lora_embedding_B" in name:
        p.normal_(0.0, 0.3)
  peft_model.eval().save_pretrained(tmp_path)
  saved = peft.utils.load_peft_weights(str(tmp_path))
  assert "base_model.model.model.embed_tokens.base_layer.weight" in saved
  module, variables = from_pretrained(ckpt.folder)
  params = lora_jax.import_peft(tmp_path, variables, config=ckpt.config)
  ids, mask = mixed_batch(ckpt.config)
  ours = lora_jax.lora_apply(module.apply)(params, ids, mask)
  assert max_error(ours, module.apply(variables, ids, mask), mask) > 0.1
  assert max_error(ours, torch_logits(peft_model, ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_peft_made_adapter_imports_to_peft_logits(qwen3, scan, tmp_path):
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(qwen3.folder).eval()
  peft_config = peft.LoraConfig(
    r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0
  )
  peft_model = peft.get_peft_model(torch_model, peft_config)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
  peft_model.eval().save_pretrained(tmp_path)
  module, variables = from_pretrained(qwen3.folder, scan_layers=scan)
  if scan:  # PEFT names each layer: a scanned model without config= is told to pass it
    with pytest.raises(
      ValueError, match=r"^'.*' names each layer's modules \('params/model/layers/0/"
    ):
      lora_jax.import_peft(tmp_path, variables)
  params = lora_jax.import_peft(tmp_path, variables, config=qwen3.config)
  ids, mask = mixed_batch(qwen3.config)
  ours = lora_jax.lora_apply(module.apply)(params, ids, mask)
  ref = torch_logits(peft_model, ids, mask)
  assert max_error(ref, module.apply(variables, ids, mask), mask) > 0.1  # B is non-zero
  assert max_error(ours, ref, mask) <= 1e-4


def test_adapter_on_some_layers_only_needs_the_unscanned_model(qwen3, tmp_path):
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(qwen3.folder)
  peft_config = peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1])
  peft.get_peft_model(torch_model, peft_config).save_pretrained(tmp_path)
  _, scanned = from_pretrained(qwen3.folder, scan_layers=True)
  with pytest.raises(ValueError, match="cannot be loaded into a model with scanned layers: layer"):
    lora_jax.import_peft(tmp_path, scanned, config=qwen3.config)
  _, plain = from_pretrained(qwen3.folder)
  params = lora_jax.import_peft(tmp_path, plain, config=qwen3.config)
  layers = params["params"]["model"]["layers"]
  assert "lora_a" in layers["1"]["self_attn"]["q_proj"]
  assert "lora_a" not in layers["0"]["self_attn"]["q_proj"]


def test_stacked_adapters_need_a_config_for_peft_names(qwen3, tmp_path):
  module, variables = from_pretrained(qwen3.folder, scan_layers=True)
  params = adapted(module, variables, lora_jax.LoraRule(["q_proj"], rank=2))
  with pytest.raises(ValueError, match="stacked .scanned layers.; PEFT names each layer"):
    lora_jax.export_peft(tmp_path, params, base_model_name_or_path="x")


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_merged_export_loads_in_transformers(ckpt, scan, tmp_path):
  module, variables = from_pretrained(ckpt.folder, scan_layers=scan)
  rule = lora_jax.LoraRule("all-linear", rank=4, alpha=8)
  params = adapted(module, variables, rule)
  ids, mask = mixed_batch(ckpt.config)
  ours = lora_jax.lora_apply(module.apply)(params, ids, mask)
  lora_jax.models.export_merged(tmp_path, params, config=ckpt.config)
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(merged).__name__.endswith("ForCausalLM")
  assert max_error(ours, torch_logits(merged, ids, mask), mask) <= 1e-4


def test_stack_layers_names_the_layer_that_differs():
  tree = {"layers": {"0": {"w": np.zeros((2, 3))}, "1": {"w": np.zeros((2, 4))}}}
  with pytest.raises(ValueError, match="layer 1 of 'layers' differs from layer 0"):
    lora_jax.stack_layers(tree, "layers")
  with pytest.raises(ValueError, match="not layers numbered 0..L-1"):
    lora_jax.stack_layers({"layers": {"0": {}, "2": {}}}, "layers")
  with pytest.raises(ValueError, match="do not share one leading layer axis"):
    lora_jax.unstack_layers({"layers": {"a": np.zeros((2, 3)), "b": np.zeros((3,))}}, "layers")
