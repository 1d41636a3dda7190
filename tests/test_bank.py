"""Adapter banks: a mixed batch, each row through its own adapter, against the merge of that
adapter alone and against PEFT's mixed-adapter batches; hot swaps compile nothing new."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llm import config
from llm import mixed_batch
from llm import randomize_adapters
from llm import save_checkpoint

import lora_jax
from lora_jax import LoraRule
from lora_jax.models import from_pretrained

VOCAB, DIM, HEADS = 30, 12, 3


class Zoo(nn.Module):
  """Embed (lookup and attend), Dense, DenseGeneral over heads (in and out), Einsum."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(VOCAB, DIM, name="embed")
    h = embed(ids)
    q = nn.DenseGeneral((HEADS, DIM // HEADS), name="heads")(h)
    h = h + nn.DenseGeneral(DIM, axis=(-2, -1), name="merge_heads")(jnp.tanh(q))
    h = h + nn.Einsum((DIM, DIM), "btd,de->bte", name="mix")(h)
    h = h + nn.Dense(DIM, name="proj")(jax.nn.gelu(h))
    return embed.attend(h)


class Layer(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(DIM, name="proj")(jnp.tanh(h)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(VOCAB, DIM, name="embed")(ids)
    layers = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    h, _ = layers(name="layers")(h, None)
    return h


def _adapters(model, x, rules):
  base = jax.jit(model.init)(jax.random.key(0), x)  # one program, not op by op
  layouts = lora_jax.kernel_layouts(model, x)
  out = {}
  for i, (name, rule) in enumerate(rules.items()):
    adapted = lora_jax.lora_init(base, rule, rng=jax.random.key(i + 1), layouts=layouts)
    out[name] = randomize_adapters(adapted, seed=i)
  return base, out


def _check_rows(model, base, adapters, x, ids, atol=1e-5):
  bank = lora_jax.adapter_bank(adapters)
  got = jax.jit(lora_jax.lora_apply(model.apply))(bank, x, adapter_ids=jnp.asarray(ids))
  names = list(adapters)
  apply = jax.jit(model.apply)  # every row's merge has the base's structure: one compile
  for row, i in enumerate(ids):
    params = base if i < 0 else lora_jax.merge(adapters[names[i]])
    want = apply(params, x[row : row + 1])
    np.testing.assert_allclose(got[row : row + 1], want, atol=atol, err_msg=f"row {row}, id {i}")
  return bank, got


RULES = {
  # different ranks, alphas, rsLoRA and targets: "fr" leaves mix and proj to the base
  "fr": LoraRule(["heads", "merge_heads", "embed"], rank=2, alpha=4.0),
  "de": LoraRule(["heads", "mix", "proj", "merge_heads"], rank=5, alpha=3.0, rslora=True),
  "it": LoraRule(["proj", "embed"], rank=3, alpha=9.0),
}


def test_each_row_equals_the_merge_of_its_own_adapter():
  model = Zoo()
  x = jax.random.randint(jax.random.key(9), (6, 5), 0, VOCAB)
  base, adapters = _adapters(model, x, RULES)
  bank, got = _check_rows(model, base, adapters, x, [0, 1, -1, 2, 1, 0])
  assert lora_jax.bank_names(bank) == ("fr", "de", "it")
  report = lora_jax.param_report(bank).splitlines()
  for name, tree in adapters.items():  # each adapter counted as if alone on the base
    assert f"adapter {name!r}: {lora_jax.param_report(tree).splitlines()[0]}" in report
  assert bank["params"]["heads"]["lora_a"].shape == (3, DIM, 5)  # padded to the largest rank
  # and a bank is not a merge of anything: a clear error, and each adapter comes back whole
  with pytest.raises(ValueError, match="holds an adapter bank"):
    lora_jax.merge(bank)
  de = lora_jax.bank_adapter(bank, "de")
  np.testing.assert_allclose(
    lora_jax.merge(de)["params"]["mix"]["kernel"],
    lora_jax.merge(adapters["de"])["params"]["mix"]["kernel"],
    atol=1e-6,
  )
  assert de["params"]["heads"]["lora_a"].shape == (DIM, 5) and "lora_a" not in de["params"]["embed"]
  # unload: the base the bank was made over, leaf for leaf
  assert lora_jax.is_bank(bank) and not lora_jax.is_bank(de)
  plain = lora_jax.unload(bank)
  assert jax.tree.structure(plain) == jax.tree.structure(base)
  for got_leaf, want in zip(jax.tree.leaves(plain), jax.tree.leaves(base), strict=True):
    np.testing.assert_array_equal(got_leaf, want)


def test_scanned_layers_bank_per_layer():
  model = Scanned()
  x = jax.random.randint(jax.random.key(3), (4, 5), 0, VOCAB)
  rules = {"a": LoraRule(["proj"], rank=2), "b": LoraRule(["proj"], rank=4, alpha=2.0)}
  base, adapters = _adapters(model, x, rules)
  bank, _ = _check_rows(model, base, adapters, x, [1, -1, 0, 1])
  assert bank["params"]["layers"]["proj"]["lora_a"].shape == (3, 2, DIM, 4)  # [L, n, in, r]


def test_ids_are_checked_and_required():
  model = Zoo()
  x = jax.random.randint(jax.random.key(9), (2, 5), 0, VOCAB)
  base, adapters = _adapters(model, x, {"fr": RULES["fr"], "de": RULES["de"]})
  bank = lora_jax.adapter_bank(adapters)
  apply = lora_jax.lora_apply(model.apply)
  with pytest.raises(ValueError, match=r"holds an adapter bank of \['fr', 'de'\]: call"):
    apply(bank, x)
  with pytest.raises(ValueError, match=r"adapter_ids holds 2: ids run from -1 .* \['fr', 'de'\]"):
    apply(bank, x, adapter_ids=[0, 2])
  with pytest.raises(ValueError, match="3 ids for a batch of 2 rows"):
    apply(bank, x, adapter_ids=[0, 1, 1])
  with pytest.raises(ValueError, match="hold no adapter bank"):
    apply(adapters["fr"], x, adapter_ids=[0, 1])
  dora = lora_jax.lora_init(base, LoraRule(["proj"], rank=2, use_dora=True), rng=jax.random.key(1))
  with pytest.raises(ValueError, match="'d' is a DoRA adapter at 'params/proj'"):
    lora_jax.adapter_bank({"fr": adapters["fr"], "d": dora})
  other = jax.tree.map(lambda v: v + 1.0, base)
  stranger = lora_jax.lora_init(other, LoraRule(["proj"], rank=2), rng=jax.random.key(1))
  with pytest.raises(ValueError, match="'x' was made over another base"):
    lora_jax.adapter_bank({"fr": adapters["fr"], "x": stranger})


def test_hot_swaps_compile_nothing_new():
  model = Zoo()
  x = jax.random.randint(jax.random.key(9), (3, 5), 0, VOCAB)
  base, adapters = _adapters(model, x, RULES)
  bank = lora_jax.adapter_bank(adapters)

  @jax.jit
  @chex.assert_max_traces(n=1)  # a second trace (a swap that compiles again) raises
  def run(bank, x, ids):
    return lora_jax.lora_apply(model.apply)(bank, x, adapter_ids=ids)

  ids = jnp.array([0, 1, 2])
  run(bank, x, ids)
  swaps = [  # another rank (<= the bank's), alpha, rsLoRA, fewer targets, new values
    ("fr", LoraRule(["heads", "embed"], rank=1, alpha=7.0)),
    ("de", LoraRule(["mix", "proj"], rank=4, alpha=2.0, rslora=True)),
    ("it", LoraRule(["proj"], rank=3, alpha=1.0)),
  ]
  layouts = lora_jax.kernel_layouts(model, x)
  for seed, (name, rule) in enumerate(swaps):
    new = lora_jax.lora_init(base, rule, rng=jax.random.key(seed), layouts=layouts)
    new = randomize_adapters(new, seed + 10)
    bank = lora_jax.replace_adapter(bank, name, new)
    adapters[name] = new
    got = run(bank, x, ids)
    i = list(adapters).index(name)
    want = model.apply(lora_jax.merge(new), x[i : i + 1])
    np.testing.assert_allclose(got[i : i + 1], want, atol=1e-5)
  too_big = lora_jax.lora_init(base, LoraRule(["proj"], rank=6), rng=jax.random.key(0))
  with pytest.raises(ValueError, match="rank 6 at 'params/proj', above the bank's padded rank 5"):
    lora_jax.replace_adapter(bank, "it", too_big)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return save_checkpoint(
    config("llama-tied-bias-llama3"), tmp_path_factory.mktemp("bank"), gain=0.6
  )


def test_mixed_batch_logits_equal_peft_mixed_adapter_batches(llama, tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(llama.folder).eval()
  configs = {
    "qv": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all": peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
  }
  peft_model = peft.get_peft_model(torch_model, configs["qv"], adapter_name="qv")
  peft_model.add_adapter("all", configs["all"])
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.2)
  peft_model.save_pretrained(tmp_path)  # one folder per adapter: qv/, all/
  module, variables = from_pretrained(llama.folder)
  adapters = {
    "qv": lora_jax.import_peft(tmp_path / "qv", variables, config=llama.config),
    "all": lora_jax.import_peft(tmp_path / "all", variables, config=llama.config),
  }
  bank = lora_jax.adapter_bank(adapters)
  ids, mask = mixed_batch(llama.config, lengths=(9, 5, 7, 2, 9), seed=3)
  rows = [0, -1, 1, 0, 1]
  ours = jax.jit(lora_jax.lora_apply(module.apply))(bank, ids, mask, adapter_ids=jnp.asarray(rows))
  names = ["__base__" if i < 0 else list(adapters)[i] for i in rows]
  peft_model.eval()
  with torch.no_grad():
    ref = (
      peft_model(torch.tensor(ids), attention_mask=torch.tensor(mask), adapter_names=names)
      .logits.float()
      .numpy()
    )
  keep = mask.astype(bool)
  plain = np.asarray(module.apply(variables, ids, mask))
  for row in (0, 2, 3, 4):  # the adapters change these rows' logits
    assert np.abs(plain[row][keep[row]] - ref[row][keep[row]]).max() > 0.05, row
  np.testing.assert_allclose(np.asarray(ours)[keep], ref[keep], atol=1e-4, rtol=0)
  # a PEFT folder into the running bank, one call: slot "qv" now holds "all" as well
  swapped = lora_jax.replace_adapter(bank, "qv", tmp_path / "all", config=llama.config)
  both = jax.jit(lora_jax.lora_apply(module.apply))(
    swapped, ids[[0, 0]], mask[[0, 0]], adapter_ids=jnp.array([0, 1])
  )
  np.testing.assert_allclose(both[0], both[1], atol=1e-6)


def test_generation_per_row_equals_peft_per_adapter_generation(llama, tmp_path):
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  import transformers

  from lora_jax.models import generate

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(llama.folder).eval()
  peft_model = peft.get_peft_model(
    torch_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "qv"
  )
  peft_model.add_adapter("all", peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.3)
  peft_model.save_pretrained(tmp_path)
  module, variables = from_pretrained(llama.folder)
  names = ["qv", "all"]
  bank = lora_jax.adapter_bank(
    {n: lora_jax.import_peft(tmp_path / n, variables, config=llama.config) for n in names}
  )
  prompts = [[1, 5, 9, 14], [1, 7], [3, 8, 2], [1, 5, 9, 14]]
  rows = [0, 1, -1, 1]
  eos = llama.config.eos_token_id
  ours = generate(module, bank, prompts, max_new_tokens=6, adapter_ids=rows, eos_token_id=eos)
  peft_model.eval()
  for prompt, i, got in zip(prompts, rows, ours, strict=True):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      if i < 0:
        with peft_model.disable_adapter():
          out = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
      else:
        peft_model.set_adapter(names[i])
        out = peft_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert got == out[0, len(prompt) :].tolist(), (prompt, i)
  assert ours[0] != ours[3]  # the same prompt through two adapters
  with pytest.raises(ValueError, match=r"adapter_ids holds 2: .* \['qv', 'all'\]"):
    generate(module, bank, prompts[:2], max_new_tokens=2, adapter_ids=[0, 2])


def _train(model, params, batches, steps=20):
  """AdamW with weight decay on the adapters of ``params`` (a bank or one adapter): the loss
  of each batch is the sum of its rows' weighted losses, so rows do not depend on each other."""
  import optax

  tx = lora_jax.lora_optimizer(optax.adamw(3e-2, weight_decay=0.1), params)
  trainable, frozen = lora_jax.partition(params, lora_jax.trainable_mask(params))
  state = tx.init(trainable)
  apply = lora_jax.lora_apply(model.apply)

  @jax.jit
  def step(trainable, state, x, y, w, ids):
    def loss(trainable):
      kw = {} if ids is None else {"adapter_ids": ids}
      logits = apply(lora_jax.combine(trainable, frozen), x, **kw)
      per_row = jnp.mean((logits - y) ** 2, axis=tuple(range(1, logits.ndim)))
      return jnp.sum(w * per_row)

    grads = jax.grad(loss)(trainable)
    updates, state = tx.update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state

  for i in range(steps):
    x, y, w, ids = batches[i % len(batches)]
    trainable, state = step(trainable, state, x, y, w, ids)
  return lora_jax.combine(trainable, frozen)


def test_a_mixed_batch_trains_each_adapter_as_if_alone():
  model = Zoo()
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randint(0, VOCAB, (6, 5)))
  y = jnp.asarray(rng.randn(6, 5, VOCAB).astype(np.float32))
  w = jnp.asarray(rng.uniform(0.5, 2.0, 6).astype(np.float32))
  ids = np.array([0, 1, 1, 0, 1, 0])
  rules = {"fr": RULES["fr"], "de": RULES["de"], "it": RULES["it"]}  # "it" gets no rows
  base, adapters = _adapters(model, x, rules)
  bank = lora_jax.adapter_bank(adapters)
  trained = _train(model, bank, [(x, y, w, jnp.asarray(ids))])
  for i, name in enumerate(["fr", "de"]):
    rows = ids == i
    alone = _train(model, adapters[name], [(x[rows], y[rows], w[rows], None)])
    got = lora_jax.bank_adapter(trained, name)
    for module, leaves in alone["params"].items():
      if "lora_a" in leaves:
        for leaf in ("lora_a", "lora_b"):
          np.testing.assert_allclose(
            got["params"][module][leaf], leaves[leaf], atol=1e-5, err_msg=f"{name} {module}"
          )
    moved = float(
      jnp.abs(
        alone["params"]["heads"]["lora_a"] - adapters[name]["params"]["heads"]["lora_a"]
      ).max()
    )
    assert moved > 1e-3
  for leaf in ("lora_a", "lora_b"):  # "it" had no rows: bit-identical, weight decay included
    for module in ("proj", "embed"):
      np.testing.assert_array_equal(
        trained["params"][module][leaf][2], bank["params"][module][leaf][2], err_msg=module
      )
  # padded rank slots stay zero: "fr" has rank 2 in heads, padded to 5
  np.testing.assert_array_equal(trained["params"]["heads"]["lora_a"][0][:, 2:], 0.0)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_a_mixed_batch_training_step_lowers_for_gpu_and_tpu(platform):
  """A scanned, rematted bf16 Llama with a bank of two adapters: its training step over a mixed
  batch lowers for each accelerator from this CPU (built on shapes alone)."""
  from lora_jax.models import auto_model

  module = auto_model(
    config("llama-tied-bias-llama3"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
    scan_layers=True, remat=True,
  )  # fmt: skip
  ids = jnp.ones((4, 16), jnp.int32)
  variables = jax.eval_shape(module.init, jax.random.key(0), ids)
  layouts = lora_jax.kernel_layouts(module, ids)

  def make_bank(v):
    rules = [LoraRule(["q_proj", "v_proj"], rank=4), LoraRule("all-linear", rank=8)]
    return lora_jax.adapter_bank({
      f"a{i}": lora_jax.lora_init(v, r, rng=jax.random.key(i), layouts=layouts)
      for i, r in enumerate(rules)
    })  # fmt: skip

  bank = jax.eval_shape(make_bank, variables)
  trainable, frozen = lora_jax.partition(bank, lora_jax.trainable_mask(bank))
  apply = lora_jax.lora_apply(module.apply)

  def step(trainable, frozen, ids, adapter_ids):
    def loss(t):
      logits = apply(lora_jax.combine(t, frozen), ids, adapter_ids=adapter_ids)
      return jnp.mean(logits.astype(jnp.float32) ** 2)

    return jax.grad(loss)(trainable)

  exported = jax.export.export(jax.jit(step), platforms=(platform,))(
    trainable, frozen, ids, jnp.array([0, 1, -1, 1])
  )
  assert exported.platforms == (platform,)
