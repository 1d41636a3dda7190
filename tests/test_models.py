"""lora_jax.models: parity with transformers' PyTorch BERT/RoBERTa, loading, errors."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pty
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import traverse_util
from safetensors.numpy import save_file

from lora_jax.models import auto_model
from lora_jax.models import flax_to_hf
from lora_jax.models import from_pretrained
from lora_jax.models import hf_to_flax
from lora_jax.models import read_state_dict
from lora_jax.models.hf import loading

SMALL = dict(
  vocab_size=99,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
)
SENTENCES = [
  "A quiet, moving film about growing old.",
  "Terrible.",
  "The plot is thin, but the performances carry it a long way home.",
]


def small_config(model_type: str, **kw):
  kw = {**SMALL, **kw}
  if model_type == "bert":
    return transformers.BertConfig(max_position_embeddings=32, **kw)
  return transformers.RobertaConfig(max_position_embeddings=34, type_vocab_size=1, **kw)


def padded_batch(config, lengths=(9, 5, 2), seq=9, seed=0):
  """Random ids (never the pad id) padded at the end to ``lengths``, and the mask."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, config.vocab_size, size=(len(lengths), seq))
  mask = (np.arange(seq)[None] < np.array(lengths)[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, config.pad_token_id)
  types = rng.randint(0, config.type_vocab_size, size=ids.shape) * mask
  return ids, mask, types


def save_torch_model(config, folder, task="sequence-classification", seed=0):
  torch = pytest.importorskip("torch")
  torch.manual_seed(seed)
  cls = {
    "base": transformers.AutoModel,
    "sequence-classification": transformers.AutoModelForSequenceClassification,
  }[task]
  model = cls.from_config(config).eval()
  model.save_pretrained(folder)
  return model


def torch_forward(model, ids, mask, types=None):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = model(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=None if types is None else torch.tensor(types),
      output_hidden_states=True,
    )
  return out


def assert_close_unpadded(hidden, ref, mask, atol):
  keep = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(hidden)[keep], np.asarray(ref)[keep], atol=atol, rtol=0)


class Checkpoint(NamedTuple):
  config: Any
  torch_model: Any
  folder: pathlib.Path


def _checkpoint(tmp_path_factory, model_type, num_labels):
  config = small_config(model_type, num_labels=num_labels)
  folder = tmp_path_factory.mktemp(model_type)
  return Checkpoint(config, save_torch_model(config, folder), folder)


# Saved once per module: JAX compiles slowly on small CPUs, and loading a checkpoint compiles
# nothing where ``init`` would compile a random initialiser per parameter.
@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory) -> Checkpoint:
  return _checkpoint(tmp_path_factory, "bert", num_labels=3)


@pytest.fixture(scope="module")
def roberta_ckpt(tmp_path_factory) -> Checkpoint:
  return _checkpoint(tmp_path_factory, "roberta", num_labels=1)


# ---------------------------------------------------------------------------------------------
# Parity with transformers.


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_parity_random_checkpoint(request, model_type):
  config, torch_model, folder = request.getfixturevalue(f"{model_type}_ckpt")
  ids, mask, types = padded_batch(config)
  ref = torch_forward(torch_model, ids, mask, types)

  module, variables = from_pretrained(folder, "sequence-classification")
  logits = jax.jit(module.apply)(variables, ids, mask, types)
  assert logits.shape == (3, config.num_labels) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=0)

  base, base_vars = from_pretrained(folder, "base")
  hidden = base.apply(base_vars, ids, attention_mask=mask, token_type_ids=types)
  assert hidden.shape == (3, 9, 64)
  assert_close_unpadded(hidden, ref.hidden_states[-1].numpy(), mask, atol=1e-4)


def test_parity_minilm(minilm_path):
  torch = pytest.importorskip("torch")
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  assert (batch["attention_mask"] == 0).any(), "the batch should contain padding"
  torch_model = transformers.BertModel.from_pretrained(minilm_path).eval()
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state

  module, variables = from_pretrained(minilm_path)
  hidden = module.apply(
    variables,
    batch["input_ids"],
    attention_mask=batch["attention_mask"],
    token_type_ids=batch["token_type_ids"],
  )
  assert_close_unpadded(hidden, ref.numpy(), batch["attention_mask"], atol=1e-4)


def test_minilm_bfloat16_logits_close_to_float32(minilm_path):
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  inputs = (batch["input_ids"], batch["attention_mask"])
  # The same random head for both, at unit scale (the default init, std 0.02, would make
  # every logit smaller than the tolerance).
  kernel = jax.random.normal(jax.random.key(0), (384, 2)) / np.sqrt(384)
  logits = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    module, variables = from_pretrained(
      minilm_path, "sequence-classification", num_labels=2, dtype=dtype, rng=7
    )
    variables["params"]["classifier"]["kernel"] = kernel
    logits[dtype] = module.apply(variables, *inputs)
  assert logits[jnp.bfloat16].dtype == jnp.float32
  assert float(jnp.abs(logits[jnp.float32]).max()) > 0.1
  np.testing.assert_allclose(logits[jnp.bfloat16], logits[jnp.float32], atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------
# Layout: names, export, remat.


def test_param_paths_follow_hugging_face_modules():
  def paths(model_type):
    module = auto_model(small_config(model_type), "sequence-classification")
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    return set(traverse_util.flatten_dict(shapes["params"], sep="/"))

  common = {
    "embeddings/word_embeddings/embedding",
    "embeddings/position_embeddings/embedding",
    "embeddings/token_type_embeddings/embedding",
    "embeddings/LayerNorm/scale",
    "encoder/layer/1/attention/self/query/kernel",
    "encoder/layer/1/attention/self/key/bias",
    "encoder/layer/1/attention/self/value/kernel",
    "encoder/layer/1/attention/output/dense/kernel",
    "encoder/layer/1/attention/output/LayerNorm/bias",
    "encoder/layer/1/intermediate/dense/kernel",
    "encoder/layer/1/output/dense/kernel",
    "encoder/layer/1/output/LayerNorm/scale",
  }
  bert, roberta = paths("bert"), paths("roberta")
  assert common <= bert and common <= roberta
  assert {"pooler/dense/kernel", "classifier/kernel", "classifier/bias"} <= bert
  assert {"classifier/dense/kernel", "classifier/out_proj/bias"} <= roberta
  assert not any(p.startswith("pooler") for p in roberta)


def test_flax_to_hf_round_trips_the_torch_state_dict(bert_ckpt):
  config, torch_model, folder = bert_ckpt
  _, variables = from_pretrained(folder, "sequence-classification")
  exported = flax_to_hf(variables, config)
  reference = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  reference = {k: v for k, v in reference.items() if not k.endswith(("position_ids", "type_ids"))}
  assert sorted(exported) == sorted(reference)
  for name, array in exported.items():
    np.testing.assert_array_equal(array, reference[name], err_msg=name)
  back = hf_to_flax(exported, config)
  assert jax.tree.all(jax.tree.map(np.array_equal, back, dict(variables["params"])))


def test_remat_keeps_names_and_outputs(roberta_ckpt):
  config, _, folder = roberta_ckpt
  ids, mask, _ = padded_batch(config)
  plain, variables = from_pretrained(folder, "sequence-classification")
  remat, remat_vars = from_pretrained(folder, "sequence-classification", remat=True)
  assert jax.tree.structure(variables) == jax.tree.structure(remat_vars)
  rngs = {"dropout": jax.random.key(1)}

  def loss(v):  # deterministic=False: the static argument remat must see as a Python bool.
    return jnp.mean(remat.apply(v, ids, mask, deterministic=False, rngs=rngs) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(variables)
  ref = jnp.mean(plain.apply(variables, ids, mask, deterministic=False, rngs=rngs) ** 2)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  query_grad = grads["params"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
  assert float(jnp.abs(query_grad).max()) > 0


# ---------------------------------------------------------------------------------------------
# Dropout.


def test_dropout_only_when_not_deterministic(bert_ckpt):
  config, _, folder = bert_ckpt
  model, variables = from_pretrained(folder, "sequence-classification")
  ids, mask, _ = padded_batch(config)

  def run(deterministic, seed):
    rngs = {"dropout": jax.random.key(seed)}
    return model.apply(variables, ids, mask, deterministic=deterministic, rngs=rngs)

  np.testing.assert_array_equal(run(True, 1), run(True, 2))
  np.testing.assert_array_equal(run(True, 1), model.apply(variables, ids, mask))
  assert not np.allclose(run(False, 1), run(False, 2))
  np.testing.assert_array_equal(run(False, 1), run(False, 1))


# ---------------------------------------------------------------------------------------------
# Loading: files, Hub path, reports and errors.


def test_missing_head_is_initialised_and_reported_once(tmp_path, caplog):
  config = small_config("bert")
  save_torch_model(config, tmp_path, task="base")
  with caplog.at_level(logging.WARNING, logger="lora_jax.models"):
    module, variables = from_pretrained(tmp_path, "sequence-classification", num_labels=4, rng=3)
  (record,) = [r for r in caplog.records if r.name.startswith("lora_jax")]
  assert "newly initialized" in record.getMessage()
  assert "classifier.weight" in record.getMessage() and "classifier.bias" in record.getMessage()
  assert "pooler" not in record.getMessage()
  assert variables["params"]["classifier"]["kernel"].shape == (64, 4)
  assert float(jnp.std(variables["params"]["classifier"]["kernel"])) > 0
  _, again = from_pretrained(tmp_path, "sequence-classification", num_labels=4, rng=3)
  np.testing.assert_array_equal(
    variables["params"]["classifier"]["kernel"], again["params"]["classifier"]["kernel"]
  )


def test_unused_tensors_are_reported_once(roberta_ckpt, caplog):
  with caplog.at_level(logging.WARNING, logger="lora_jax.models"):
    from_pretrained(roberta_ckpt.folder, "base")
  (record,) = [r for r in caplog.records if r.name.startswith("lora_jax")]
  assert "not used" in record.getMessage()
  assert "classifier.out_proj.weight" in record.getMessage()


def test_shape_and_name_mismatches_are_listed_together(bert_ckpt, tmp_path):
  bert_ckpt.config.save_pretrained(tmp_path)
  state = read_state_dict(bert_ckpt.folder)
  state["bert.encoder.layer.0.attention.self.query.weight"] = np.zeros((32, 64), np.float32)
  state["bert.embeddings.word_embeddings.weight"] = np.zeros((98, 64), np.float32)
  del state["bert.encoder.layer.1.output.dense.bias"]
  save_file(state, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as info:
    from_pretrained(tmp_path, "sequence-classification")
  message = str(info.value)
  assert "3 mismatch(es)" in message
  assert "bert.encoder.layer.0.attention.self.query.weight" in message
  assert "expected (64, 64), got (32, 64)" in message
  assert "expected (99, 64), got (98, 64)" in message
  assert "bert.encoder.layer.1.output.dense.bias (encoder/layer/1/output/dense/bias)" in message
  assert "expected (64,), missing" in message


def test_unknown_model_type_names_supported_ones(tmp_path):
  with pytest.raises(ValueError, match=r"'gpt2'.*bert, roberta"):
    auto_model(transformers.GPT2Config())
  transformers.GPT2Config().save_pretrained(tmp_path)
  save_file({"wte.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"'gpt2'.*bert, roberta"):
    from_pretrained(tmp_path)


def test_bad_task_and_activation_are_named():
  with pytest.raises(ValueError, match=r"'token-classification'.*sequence-classification"):
    auto_model(small_config("bert"), "token-classification")
  with pytest.raises(ValueError, match=r"'gelu_10'.*gelu_new"):
    auto_model(small_config("bert", hidden_act="gelu_10"))


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_other_activations_match_torch(tmp_path, hidden_act):
  config = small_config("bert", hidden_act=hidden_act)
  torch_model = save_torch_model(config, tmp_path, task="base")
  ids, mask, types = padded_batch(config)
  ref = torch_forward(torch_model, ids, mask, types).last_hidden_state.numpy()
  module, variables = from_pretrained(tmp_path)
  hidden = module.apply(variables, ids, mask, types)
  assert_close_unpadded(hidden, ref, mask, atol=1e-4)


def test_torch_bin_checkpoint(roberta_ckpt, tmp_path):
  torch = pytest.importorskip("torch")
  roberta_ckpt.config.save_pretrained(tmp_path)
  torch.save(roberta_ckpt.torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  _, from_st = from_pretrained(roberta_ckpt.folder, "sequence-classification")
  _, from_bin = from_pretrained(tmp_path, "sequence-classification")
  jax.tree.map(np.testing.assert_array_equal, from_st, from_bin)


def test_torch_bin_without_torch_says_torch_is_needed(tmp_path, monkeypatch):
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs torch"):
    read_state_dict(tmp_path)


def test_sharded_and_bfloat16_safetensors(tmp_path):
  import ml_dtypes

  state = {"a.weight": np.ones((2, 3), ml_dtypes.bfloat16), "b.bias": np.arange(3.0)}
  save_file({"a.weight": state["a.weight"]}, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({"b.bias": state["b.bias"]}, str(tmp_path / "model-00002-of-00002.safetensors"))
  index = {
    "weight_map": {
      "a.weight": "model-00001-of-00002.safetensors",
      "b.bias": "model-00002-of-00002.safetensors",
    }
  }
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  loaded = read_state_dict(tmp_path)
  assert loaded["a.weight"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded["b.bias"], state["b.bias"])


def test_no_weights_file_lists_what_was_expected(tmp_path):
  small_config("bert").save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*config\.json"):
    from_pretrained(tmp_path)


def test_hub_ids_go_through_snapshot_download(roberta_ckpt, tmp_path, monkeypatch):
  import huggingface_hub

  calls = []

  def fake_snapshot_download(repo_id, revision=None, cache_dir=None, allow_patterns=()):
    calls.append((repo_id, revision))
    dest = tmp_path / "cache" / str(len(calls))
    dest.mkdir(parents=True)
    for f in roberta_ckpt.folder.iterdir():
      if any(fnmatch(f.name, p) for p in allow_patterns):
        shutil.copy(f, dest / f.name)
    return str(dest)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  module, variables = from_pretrained("someone/tiny-roberta", "sequence-classification")
  assert calls == [("someone/tiny-roberta", None)]
  assert "classifier" in variables["params"]
  with pytest.raises(FileNotFoundError, match="not a model folder"):
    loading.resolve_folder(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# With the LoRA core.


def test_fresh_lora_adapter_leaves_outputs_identical(roberta_ckpt):
  from lora_jax import LoraRule
  from lora_jax import lora_apply
  from lora_jax import lora_init

  model, variables = from_pretrained(roberta_ckpt.folder, "sequence-classification")
  ids, mask, _ = padded_batch(roberta_ckpt.config)
  rule = LoraRule(["query", "value", "output.dense", "word_embeddings"], rank=4)
  adapted = lora_init(variables, rule, rng=jax.random.key(1))
  np.testing.assert_array_equal(
    lora_apply(model.apply)(adapted, ids, mask), model.apply(variables, ids, mask)
  )


def test_roberta_base_param_report_matches_the_lora_write_up():
  """The write-up's line for roberta-base, r=4 on query and output.dense, head trained."""
  from lora_jax import LoraRule
  from lora_jax import lora_init
  from lora_jax import param_report

  config = transformers.RobertaConfig(max_position_embeddings=514, type_vocab_size=1, num_labels=2)
  module = auto_model(config, "sequence-classification")
  ids = jnp.ones((1, 8), jnp.int32)
  rule = LoraRule(["query", "output.dense"], rank=4)
  shapes = jax.eval_shape(
    lambda: lora_init(module.init(jax.random.key(0), ids), rule, rng=jax.random.key(1))
  )
  first = param_report(shapes, extra_trainable=("classifier",)).splitlines()[0]
  assert first == "trainable params: 923,906 || all params: 124,978,946 || trainable%: 0.7392"


def test_roberta_base_param_counts_match_peft_own_count():
  """PEFT's get_nb_trainable_parameters on the same model and LoRA setup (a meta-device model:
  nothing allocated). PEFT counts the ``modules_to_save`` head twice (the original and its
  trained copy), so its total is ours plus the head."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from lora_jax import LoraRule
  from lora_jax import lora_init
  from lora_jax._src.report import count_params

  config = transformers.RobertaConfig(max_position_embeddings=514, type_vocab_size=1, num_labels=2)
  with torch.device("meta"):
    torch_model = transformers.AutoModelForSequenceClassification.from_config(config)
  peft_config = peft.LoraConfig(
    r=4, target_modules=["query", "output.dense"], modules_to_save=["classifier"]
  )
  trainable, total = peft.get_peft_model(torch_model, peft_config).get_nb_trainable_parameters()
  module = auto_model(config, "sequence-classification")
  rule = LoraRule(["query", "output.dense"], rank=4)
  shapes = jax.eval_shape(
    lambda: lora_init(module.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32)), rule,
                      rng=jax.random.key(1))
  )  # fmt: skip
  ours_trainable, ours_total = count_params(shapes, extra_trainable=("classifier",))
  head = sum(x.size for x in jax.tree.leaves(shapes["params"]["classifier"]))
  assert (ours_trainable, ours_total + head) == (trainable, total)


def test_a_checkpoint_never_runs_its_own_code(tmp_path):
  """trust_remote_code is False, not unset: on a terminal transformers would ask whether to run
  the checkpoint's Python file; here it refuses at once and the file is never imported."""
  marker = tmp_path / "ran"
  (tmp_path / "configuration_evil.py").write_text(
    f"import pathlib\npathlib.Path({str(marker)!r}).write_text('yes')\n"
    "from transformers import PretrainedConfig\n"
    "class EvilConfig(PretrainedConfig):\n  model_type = 'evil'\n"
  )
  (tmp_path / "config.json").write_text(
    json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}})
  )
  script = (
    "import sys\nfrom lora_jax.models import from_pretrained\n"
    f"try:\n  from_pretrained({str(tmp_path)!r})\n"
    "except ValueError as e:\n  print('REFUSED', 'trust_remote_code' in str(e))\n"
  )
  primary, secondary = pty.openpty()  # a terminal, where transformers would prompt
  try:
    out = subprocess.run(
      [sys.executable, "-c", script],
      stdin=secondary,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
  finally:
    os.close(primary)
    os.close(secondary)
  assert "REFUSED True" in out.stdout, out.stdout + out.stderr[-2000:]
  assert "Do you wish to run the custom code" not in out.stdout + out.stderr
  assert not marker.exists()
