"""export_peft / import_peft / export_merged: file format and logits against real PEFT."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from helpers import TINY_BERT
from helpers import with_numpy_adapters

import lora_jax
from lora_jax import KernelLayout
from lora_jax import LoraRule
from lora_jax import export_peft
from lora_jax import import_peft
from lora_jax import lora_init
from lora_jax._src import paths
from lora_jax._src.files import read_safetensors
from lora_jax.models import export_merged
from lora_jax.models import from_pretrained

SENTENCES = [
  "A quiet, moving film about growing old.",
  "Terrible.",
  "The plot is thin, but the performances carry it a long way home.",
]
ATOL = 1e-4


def _specs(tree):
  """``{path: LoraSpec without rule}``: PEFT does not store lora_jax's rule descriptions."""
  out = {}
  for path, module in paths.iter_modules(paths.split_params(tree)[0]):
    if "lora_spec" in module:
      spec = module["lora_spec"]
      out[path] = (spec.rank, spec.alpha, spec.rslora, spec.dropout, spec.weight)
  return out


def _assert_same(got, want):
  """Same leaves (bit-exact, same dtypes) and the same adapter settings."""
  got_flat = {paths.keypath_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(got)}
  want_flat = {paths.keypath_str(k): v for k, v in jax.tree_util.tree_leaves_with_path(want)}
  assert sorted(got_flat) == sorted(want_flat)
  for k, w in want_flat.items():
    g = np.asarray(got_flat[k])
    assert g.dtype == np.asarray(w).dtype, k
    np.testing.assert_array_equal(g, np.asarray(w), err_msg=k)
  assert _specs(got) == _specs(want)


def _torch_logits(model, batch):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    out = model(**{k: torch.tensor(np.asarray(v)) for k, v in batch.items()})
  return out.logits.numpy()


# ---------------------------------------------------------------------------------------------
# A tiny random BERT: format against PEFT's own files, round trips, rank/alpha patterns.

TINY = TINY_BERT
TINY_RULES = [
  LoraRule(["query"], rank=4, alpha=8, dropout=0.1, rslora=True),
  LoraRule(["value"], rank=2, alpha=8, dropout=0.1, rslora=True),
  LoraRule(["word_embeddings"], rank=4, alpha=16, dropout=0.1, rslora=True),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch = pytest.importorskip("torch")
  config = transformers.BertConfig(**TINY)
  folder = tmp_path_factory.mktemp("tiny-bert")
  torch.manual_seed(0)
  transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
  module, base = from_pretrained(folder, "sequence-classification")
  params = with_numpy_adapters(base, TINY_RULES, seed=1)
  head = params["params"]["classifier"]
  params["params"]["classifier"] = {k: v + 0.5 for k, v in head.items()}
  return config, folder, module, base, params


def test_export_writes_what_peft_writes(tiny, tmp_path):
  peft = pytest.importorskip("peft")
  config, folder, _, _, params = tiny
  ours = export_peft(
    tmp_path / "ours",
    params,
    base_model_name_or_path=str(folder),
    config=config,
    extra_trainable=["classifier"],
  )
  torch_model = transformers.BertForSequenceClassification.from_pretrained(folder)
  reference = peft.get_peft_model(
    torch_model,
    peft.LoraConfig(
      r=4,
      lora_alpha=8,
      lora_dropout=0.1,
      use_rslora=True,
      target_modules=["query", "value", "word_embeddings"],
      rank_pattern={"value": 2},
      alpha_pattern={"word_embeddings": 16},
      modules_to_save=["classifier"],
      task_type="SEQ_CLS",
    ),
  )
  reference.save_pretrained(tmp_path / "peft")
  theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  mine = json.loads((ours / "adapter_config.json").read_text())
  assert sorted(mine) == sorted(theirs)
  for key in theirs:
    if key in ("target_modules", "modules_to_save", "base_model_name_or_path"):
      continue
    assert mine[key] == theirs[key], key
  assert sorted(mine["target_modules"]) == sorted(theirs["target_modules"])
  assert set(mine["modules_to_save"]) <= set(theirs["modules_to_save"])
  assert mine["base_model_name_or_path"] == str(folder)

  from safetensors import safe_open

  files = [ours / "adapter_model.safetensors", tmp_path / "peft" / "adapter_model.safetensors"]
  mine_t, theirs_t = (safe_open(f, "np") for f in files)
  mine_meta = dict(mine_t.metadata())
  crcs = json.loads(mine_meta.pop("lora_jax.crc32"))  # lora_jax's checksums, which PEFT ignores
  assert mine_meta == theirs_t.metadata() == {"format": "pt"}
  assert sorted(crcs) == sorted(mine_t.keys())
  shapes = [{k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} for f in (mine_t, theirs_t)]
  assert shapes[0] == shapes[1]
  assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in shapes[0]
  assert shapes[0]["base_model.model.classifier.weight"] == (3, 32)


def test_peft_loads_the_export_and_matches(tiny, tmp_path):
  peft = pytest.importorskip("peft")
  config, folder, module, _, params = tiny
  export_peft(
    tmp_path,
    params,
    base_model_name_or_path=str(folder),
    config=config,
    extra_trainable="classifier",
  )
  torch_base = transformers.BertForSequenceClassification.from_pretrained(folder)
  model = peft.PeftModel.from_pretrained(torch_base, tmp_path).eval()
  rng = np.random.RandomState(0)
  ids = rng.randint(1, TINY["vocab_size"], (3, 7))
  mask = np.ones_like(ids)
  mask[1, 4:] = 0
  types = np.zeros_like(ids)
  batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
  want = _torch_logits(model, batch)
  got = jax.jit(lora_jax.lora_apply(module.apply))(params, ids, mask, types)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)


def test_round_trip_is_bit_exact_with_config(tiny, tmp_path):
  config, folder, _, base, params = tiny
  export_peft(
    tmp_path, params, base_model_name_or_path="x", config=config, extra_trainable=["classifier"]
  )
  _assert_same(import_peft(tmp_path, base, config=config), params)
  _assert_same(import_peft(tmp_path, params, config=config), params)  # replaces adapters


def test_round_trip_is_bit_exact_without_config(tmp_path):
  rng = np.random.RandomState(0)
  base = {
    "block": {"proj": {"kernel": rng.randn(6, 5).astype(np.float32)}},
    "embed": {"embedding": rng.randn(11, 6).astype(np.float32)},
    "head": {"kernel": rng.randn(5, 2).astype(jnp.bfloat16), "bias": np.zeros(2, jnp.bfloat16)},
  }
  rules = [LoraRule(["proj"], rank=3, alpha=1.5), LoraRule(["embed"], rank=2, alpha=4)]
  params = with_numpy_adapters(base, rules, seed=2)
  params["head"] = {k: (v.astype(np.float32) + 1).astype(v.dtype) for k, v in base["head"].items()}
  export_peft(tmp_path, params, base_model_name_or_path="m", task_type=None, extra_trainable="head")
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  # One module each: ties go to the smaller value; the other one becomes a pattern.
  assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]) == (2, 1.5, {"proj": 3})
  assert cfg["alpha_pattern"] == {"embed": 4}
  assert (cfg["target_modules"], cfg["modules_to_save"]) == (["embed", "proj"], ["head"])
  keys = set(read_safetensors(tmp_path / "adapter_model.safetensors"))
  assert "base_model.model.block.proj.lora_A.weight" in keys
  assert "base_model.model.embed.lora_embedding_B" in keys
  assert "base_model.model.head.kernel" in keys
  _assert_same(import_peft(tmp_path, base), params)


def test_ignore_mismatched_sizes_keeps_the_models_head(tmp_path, caplog):
  """An MNLI adapter (3-label head) starting a 2-label task: the factors load, the head is
  refused unless ``ignore_mismatched_sizes``, which keeps the model's own head and says so."""
  rng = np.random.RandomState(0)
  proj = {"kernel": rng.randn(6, 5).astype(np.float32)}
  three = {"proj": proj, "head": {"kernel": rng.randn(5, 3).astype(np.float32)}}
  params = with_numpy_adapters(three, [LoraRule(["proj"], rank=2)], seed=1)
  export_peft(tmp_path, params, base_model_name_or_path="m", task_type=None, extra_trainable="head")
  two = {"proj": proj, "head": {"kernel": np.zeros((5, 2), np.float32)}}
  with pytest.raises(
    ValueError, match=r"head/kernel: saved with shape \(5, 3\), base has \(5, 2\)"
  ):
    import_peft(tmp_path, two)
  with caplog.at_level("WARNING"):
    got = import_peft(tmp_path, two, ignore_mismatched_sizes=True)
  assert "head/kernel (saved (5, 3), model (5, 2))" in caplog.text
  np.testing.assert_array_equal(got["head"]["kernel"], two["head"]["kernel"])
  np.testing.assert_array_equal(got["proj"]["lora_b"], params["proj"]["lora_b"])


def test_hub_ids_download_with_huggingface_hub(tiny, tmp_path, monkeypatch):
  import huggingface_hub

  config, _, _, base, params = tiny
  export_peft(tmp_path / "repo", params, base_model_name_or_path="x", config=config)
  calls = []

  def fake_download(**kwargs):
    calls.append(kwargs)
    return str(tmp_path / "repo")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  got = import_peft("someone/tiny-bert-lora", base, config=config, revision="v1")
  assert calls[0]["repo_id"] == "someone/tiny-bert-lora" and calls[0]["revision"] == "v1"
  assert "adapter_model.safetensors" in calls[0]["allow_patterns"]
  assert _specs(got) == _specs(params)


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
  config, _, _, base, params = tiny
  folder = tmp_path_factory.mktemp("exported")
  export_peft(folder, params, base_model_name_or_path="x", config=config)
  return config, base, folder


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("use_dora", True, r"use_dora=True but lora_magnitude_vector is missing"),
    ("use_dora", 1, r"use_dora=1 \(DoRA; supported"),
    ("peft_type", "IA3", r"peft_type='IA3'.*LoRA adapters only"),
    ("bias", "all", r"bias='all' \(trained biases; supported: \['none', None\]\)"),
    ("init_lora_weights", "pissa", r"init_lora_weights='pissa' \(this initialisation rewrites"),
    ("fan_in_fan_out", True, r"fan_in_fan_out=True"),
    ("trainable_token_indices", [1, 2], r"trainable_token_indices=\[1, 2\]"),
  ],
)
def test_unsupported_peft_options_are_refused_by_name(exported, tmp_path, key, value, match):
  config, base, folder = exported
  shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
  with pytest.raises(ValueError, match=match):
    import_peft(tmp_path, base, config=config)


def test_damaged_safetensors_give_a_clear_error(exported, tmp_path):
  config, base, folder = exported
  shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
  weights = tmp_path / "adapter_model.safetensors"
  data = weights.read_bytes()
  for damaged in (data[: len(data) // 2], data[:5], b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json}"):
    weights.write_bytes(damaged)
    with pytest.raises(ValueError, match="not a readable safetensors file; it is probably trunc"):
      import_peft(tmp_path, base, config=config)


def test_missing_files_and_mismatched_base(exported, tmp_path):
  config, base, folder = exported
  with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder: no adapter_config"):
    import_peft(tmp_path, base, config=config)
  with pytest.raises(FileNotFoundError, match="not an adapter folder"):
    import_peft(tmp_path / "nowhere", base, config=config)
  wrong = jax.tree.map(lambda x: x, base)
  layer = wrong["params"]["encoder"]["layer"]
  layer["0"]["attention"]["self"]["query"]["kernel"] = np.zeros((32, 16), np.float32)
  del layer["1"]["attention"]["self"]["value"]
  with pytest.raises(ValueError) as e:
    import_peft(folder, wrong, config=config)
  msg = str(e.value)
  assert "2 mismatch(es)" in msg
  assert "params/encoder/layer/0/attention/self/query/kernel: the adapter needs a weight of " in msg
  assert "params/encoder/layer/1/attention/self/value/kernel" in msg
  with pytest.raises(ValueError, match="(?s)params/bert/encoder.*pass config="):
    import_peft(folder, base)  # transformers' names read as Flax paths


def test_failed_hub_download_is_reported(tmp_path, monkeypatch):
  import huggingface_hub

  def offline(**kwargs):
    raise OSError("we are offline")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(FileNotFoundError, match="downloading it as a Hub repo id failed.*offline"):
    import_peft("someone/missing-adapter", {})


def test_export_refuses_what_peft_cannot_express(tiny, tmp_path):
  config, _, _, base, params = tiny
  heads = {"params": {"heads": {"kernel": np.zeros((8, 2, 4), np.float32)}}}
  layouts = {"params/heads": KernelLayout((0,), (1, 2), "dense")}
  multi = with_numpy_adapters(heads, LoraRule(".*", rank=2), seed=0, layouts=layouts)
  with pytest.raises(ValueError, match=r"in_axes=\(0,\), out_axes=\(1, 2\).*2-D Linear"):
    export_peft(tmp_path, multi, base_model_name_or_path="x")
  mixed = with_numpy_adapters(
    base, [LoraRule(["query"], rank=2, rslora=True), LoraRule(["value"], rank=2)], seed=0
  )
  with pytest.raises(ValueError, match="one use_rslora flag"):
    export_peft(tmp_path, mixed, base_model_name_or_path="x", config=config)
  with pytest.raises(ValueError, match="belongs to the adapted module"):
    export_peft(
      tmp_path, params, base_model_name_or_path="x", config=config, extra_trainable="query/bias"
    )
  with pytest.raises(ValueError, match=r"task_type='SEQ_CLASS' is not one of \[None, 'SEQ_CLS'"):
    export_peft(tmp_path, params, base_model_name_or_path="x", task_type="SEQ_CLASS")
  with pytest.raises(ValueError, match="carry no LoRA adapters"):
    export_peft(tmp_path, base, base_model_name_or_path="x", config=config)
  assert not any(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: train in lora_jax, load in PEFT / transformers; PEFT adapter into lora_jax.

EXTRA = ["classifier"]


@pytest.fixture(scope="module")
def minilm(minilm_path):
  """MiniLM with LoRA r=8 on query,value and a trained head, after 3 AdamW steps."""
  config = transformers.AutoConfig.from_pretrained(minilm_path, num_labels=2)
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
  batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))
  assert (batch["attention_mask"] == 0).any()
  module, base = from_pretrained(minilm_path, "sequence-classification", num_labels=2)
  params = lora_init(base, LoraRule(["query", "value"], rank=8, alpha=16), rng=jax.random.key(0))
  apply = lora_jax.lora_apply(module.apply)
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params, EXTRA))
  tx = lora_jax.lora_optimizer(optax.adamw(1e-2), params, EXTRA)
  labels = jnp.array([1, 0, 1])
  inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

  @jax.jit
  def step(trainable, opt_state):
    def loss_fn(t):
      logits = apply(lora_jax.combine(t, frozen), *inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  opt_state = tx.init(trainable)
  for _ in range(3):
    trainable, opt_state = step(trainable, opt_state)
  params = lora_jax.combine(trainable, frozen)
  b = params["params"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["lora_b"]
  assert np.abs(np.asarray(b)).max() > 1e-3, "training should have moved B away from zero"
  logits = np.asarray(jax.jit(apply)(params, *inputs))
  return config, tokenizer, batch, module, base, params, logits


def test_minilm_export_loads_in_peft_with_the_same_logits(minilm, minilm_path, tmp_path):
  peft = pytest.importorskip("peft")
  config, _, batch, _, _, params, logits = minilm
  export_peft(
    tmp_path, params, base_model_name_or_path=str(minilm_path), config=config, extra_trainable=EXTRA
  )
  torch_base = transformers.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
  model = peft.PeftModel.from_pretrained(torch_base, tmp_path).eval()
  np.testing.assert_allclose(_torch_logits(model, batch), logits, atol=ATOL, rtol=0)
  _assert_same(import_peft(tmp_path, params, config=config), params)


def test_minilm_merged_export_loads_in_transformers(minilm, tmp_path):
  config, tokenizer, batch, _, _, params, logits = minilm
  folder = export_merged(tmp_path / "merged", params, config=config, tokenizer=tokenizer)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  assert type(model).__name__ == "BertForSequenceClassification"
  np.testing.assert_allclose(_torch_logits(model, batch), logits, atol=ATOL, rtol=0)
  reloaded = transformers.AutoTokenizer.from_pretrained(folder)
  assert reloaded(SENTENCES[0])["input_ids"] == tokenizer(SENTENCES[0])["input_ids"]
  assert config.architectures == ["BertModel"]  # the caller's config is left alone
  bad = transformers.AutoConfig.from_pretrained(folder, num_labels=3)
  with pytest.raises(ValueError, match="config.num_labels=3 but the classifier has 2 outputs"):
    export_merged(tmp_path / "bad", params, config=bad)


def test_minilm_peft_adapter_imports_with_the_same_logits(minilm, minilm_path, tmp_path):
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  config, _, batch, module, base, _, _ = minilm
  torch.manual_seed(0)
  torch_base = transformers.BertForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
  lora = peft.LoraConfig(
    r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS"
  )
  model = peft.get_peft_model(torch_base, lora)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name or "classifier" in name:
        p.normal_(0.0, 0.05)
  model.eval().save_pretrained(tmp_path / "peft")
  want = _torch_logits(model, batch)

  params = import_peft(tmp_path / "peft", base, config=config)
  spec = params["params"]["encoder"]["layer"]["3"]["attention"]["self"]["value"]["lora_spec"]
  assert (spec.rank, spec.alpha, spec.dropout) == (8, 16.0, 0.1)
  inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  got = jax.jit(lora_jax.lora_apply(module.apply))(params, *inputs)
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)

  # And back: the same tensors PEFT wrote.
  export_peft(
    tmp_path / "again", params, base_model_name_or_path="x", config=config, extra_trainable=EXTRA
  )
  theirs = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
  mine = read_safetensors(tmp_path / "again" / "adapter_model.safetensors")
  assert sorted(mine) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)


def test_exports_are_plain_files(minilm, tmp_path):
  """Nothing but the two PEFT files (and no temporary directories) is left behind."""
  config, _, _, _, _, params, _ = minilm
  export_peft(tmp_path / "a", params, base_model_name_or_path="m", config=config)
  assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
    "adapter_config.json",
    "adapter_model.safetensors",
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
  size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
  # adapters only, no frozen weights; the header holds each tensor's name twice (its entry and
  # its CRC-32)
  assert size < 4 * 6 * 2 * 2 * 384 * 8 + 16384


def test_modules_to_save_naming(tmp_path):
  """Whole heads are listed by their top module; a lone trained bias by its own module."""
  rng = np.random.RandomState(0)

  def dense(i, o):
    return {"kernel": rng.randn(i, o).astype(np.float32), "bias": np.zeros(o, np.float32)}

  base = {
    "encoder": {"query": dense(4, 4), "out": dense(4, 4)},
    "head": {"dense": dense(4, 4), "out_proj": dense(4, 2)},
    "head2": dense(4, 2),
  }
  params = with_numpy_adapters(base, LoraRule(["query"], rank=2), seed=0)
  extra = ["head/", "encoder/out/bias", "head2/bias"]
  export_peft(tmp_path, params, base_model_name_or_path="m", extra_trainable=extra)
  cfg = json.loads((tmp_path / "adapter_config.json").read_text())
  assert cfg["modules_to_save"] == ["encoder.out", "head", "head2"]
  _assert_same(import_peft(tmp_path, base), params)
  root = with_numpy_adapters(
    {"kernel": np.zeros((3, 2), np.float32)}, LoraRule(".*", rank=1), seed=0
  )
  with pytest.raises(ValueError, match="'params' sits at the root of the parameter tree"):
    export_peft(tmp_path, root, base_model_name_or_path="m")


# ---------------------------------------------------------------------------------------------
# RoBERTa (every paper config is RoBERTa): its position ids start after the padding id and its
# head is classifier/dense + classifier/out_proj; names, exports and logits against torch.


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
  torch = pytest.importorskip("torch")
  config = transformers.RobertaConfig(**{**TINY, "max_position_embeddings": 34}, type_vocab_size=1)
  folder = tmp_path_factory.mktemp("tiny-roberta")
  torch.manual_seed(0)
  torch_model = transformers.RobertaForSequenceClassification(config).eval()
  torch_model.save_pretrained(folder)
  module, base = from_pretrained(folder, "sequence-classification")
  rules = [LoraRule(["query", "value"], rank=4, alpha=8), LoraRule(["output.dense"], rank=2)]
  params = with_numpy_adapters(base, rules, seed=3, scale=0.5)
  head = params["params"]["classifier"]
  params["params"]["classifier"] = jax.tree.map(lambda v: v + 0.3, head)
  ids = np.array([[0, 5, 17, 42, 9, 2, 1, 1], [0, 33, 8, 2, 1, 1, 1, 1]])  # <s> ... </s> <pad>
  batch = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
  logits = lora_jax.lora_apply(module.apply)(params, batch["input_ids"], batch["attention_mask"])
  return config, folder, torch_model, base, params, batch, np.asarray(logits)


def test_roberta_flax_to_hf_gives_back_the_torch_state_dict(roberta):
  config, _, torch_model, base, *_ = roberta
  ours = lora_jax.models.flax_to_hf(base, config)
  theirs = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  theirs.pop("roberta.embeddings.token_type_ids", None)  # a buffer, not a parameter
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_roberta_adapter_and_merged_export_give_our_logits(roberta, tmp_path):
  peft = pytest.importorskip("peft")
  config, folder, _, base, params, batch, logits = roberta
  assert (
    np.abs(
      logits
      - _torch_logits(
        transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval(), batch
      )
    ).max()
    > 0.05
  )
  export_peft(tmp_path / "adapter", params, base_model_name_or_path=str(folder), config=config,
              extra_trainable=["classifier"])  # fmt: skip
  torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
  peft_model = peft.PeftModel.from_pretrained(torch_model, tmp_path / "adapter").eval()
  np.testing.assert_allclose(_torch_logits(peft_model, batch), logits, atol=ATOL)
  back = import_peft(tmp_path / "adapter", base, config=config)
  _assert_same(back, params)
  export_merged(tmp_path / "merged", params, config=config)
  merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
  assert type(merged).__name__ == "RobertaForSequenceClassification"
  np.testing.assert_allclose(_torch_logits(merged.eval(), batch), logits, atol=ATOL)
