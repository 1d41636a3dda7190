"""lora_jax.peft.names: the name mappings PEFT's files are written in, and how they are found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from lora_jax import LoraRule
from lora_jax import export_peft
from lora_jax import import_peft
from lora_jax import lora_init
from lora_jax.peft import NameMapping
from lora_jax.peft import names


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="head")(nn.Dense(4, name="dense")(x))


class _TorchNames:
  """The PyTorch twin calls ``dense`` ``fc`` and stores Linear weights as ``[out, in]``."""

  layers = None

  def module_name(self, path):
    return path.replace("dense", "fc").replace("/", ".")

  def module_path(self, name):
    return name.replace("fc", "dense").replace(".", "/")

  def to_torch(self, tree):
    return {f"head.{k}": (v.T if k == "kernel" else v) for k, v in tree["head"].items()}

  def from_torch(self, tensors):
    leaves = {k.removeprefix("head."): np.asarray(v) for k, v in tensors.items()}
    return {"head": {k: (v.T if k == "kernel" else v) for k, v in leaves.items()}}


def test_a_mapping_of_ones_own_names_the_files_and_reads_them_back(tmp_path):
  base = _Net().init(jax.random.key(0), jnp.ones((1, 3)))
  params = lora_init(base, LoraRule(["dense"], rank=2), rng=jax.random.key(1))
  assert isinstance(_TorchNames(), NameMapping)
  folder = export_peft(
    tmp_path, params, base_model_name_or_path="net", config=_TorchNames(), extra_trainable=["head"]
  )
  cfg = json.loads((folder / "adapter_config.json").read_text())
  assert cfg["target_modules"] == ["fc"] and cfg["modules_to_save"] == ["head"]
  back = import_peft(folder, base, config=_TorchNames())["params"]
  np.testing.assert_array_equal(back["dense"]["lora_a"], params["params"]["dense"]["lora_a"])
  np.testing.assert_array_equal(back["head"]["kernel"], params["params"]["head"]["kernel"])


def test_an_unregistered_model_type_is_named_with_the_registered_ones():
  with pytest.raises(ValueError, match=r"model_type 'gpt2'.*registered: \[.*'bert'.*'llama'"):
    names.names_for(transformers.GPT2Config(), {})


def test_flax_names_refuse_dotted_paths():
  with pytest.raises(ValueError, match=r"contain '\.', which PEFT uses as its separator"):
    names.names_for(None, {"a.b": {"kernel": np.zeros((2, 2))}})


def test_a_transformers_config_finds_its_family_without_importing_lora_jax_models():
  """The core never imports lora_jax.models: export_peft finds BERT's names through the
  ``lora_jax.name_mappings`` entry point, which loads the family on first need."""
  script = textwrap.dedent(
    """
    import sys, tempfile, jax, jax.numpy as jnp, transformers, lora_jax
    assert "lora_jax.models" not in sys.modules
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, num_labels=2)
    params = {"params": {"classifier": {"kernel": jnp.zeros((8, 2)), "bias": jnp.zeros(2)},
              "pooler": {"dense": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)}}}}
    params = lora_jax.lora_init(params, lora_jax.LoraRule(["pooler/dense"], rank=2),
                                rng=jax.random.key(0))
    folder = lora_jax.export_peft(tempfile.mkdtemp(), params, base_model_name_or_path="x",
                                  config=cfg)
    from safetensors.numpy import load_file
    print(sorted(load_file(folder / "adapter_model.safetensors")))
    print("lora_jax.models" in sys.modules)
    """
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  keys, loaded = out.stdout.strip().splitlines()[-2:]
  assert "base_model.model.bert.pooler.dense.lora_A.weight" in keys  # BERT's names, prefixed
  assert loaded == "True"
