"""weighted_adapter against PEFT's add_weighted_adapter: linear, cat and svd, on linear layers
and an embedding, with an adapter that lacks a module."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax._src.spec import delta

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
WEIGHTS = [0.7, -0.4]


class Net(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(11, 6)
    self.fc1 = torch.nn.Linear(6, 8)
    self.fc2 = torch.nn.Linear(8, 5)

  def forward(self, ids):
    return self.fc2(torch.relu(self.fc1(self.embed(ids))))


def _flax_base(net) -> dict:
  sd = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  return {
    "params": {
      "embed": {"embedding": jnp.asarray(sd["embed.weight"])},
      "fc1": {"kernel": jnp.asarray(sd["fc1.weight"].T), "bias": jnp.asarray(sd["fc1.bias"])},
      "fc2": {"kernel": jnp.asarray(sd["fc2.weight"].T), "bias": jnp.asarray(sd["fc2.bias"])},
    }
  }


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
  torch.manual_seed(0)
  net = Net()
  base = _flax_base(net)
  configs = {
    "x": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "fc1", "fc2"]),
    "b4": peft.LoraConfig(r=4, lora_alpha=2, target_modules=["fc1"], use_rslora=True),
    "b2": peft.LoraConfig(r=2, lora_alpha=6, target_modules=["fc1", "fc2"]),
  }
  model = peft.get_peft_model(net, configs["x"], adapter_name="x")
  for name in ("b4", "b2"):
    model.add_adapter(name, configs[name])
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.5)
  folder = tmp_path_factory.mktemp("adapters")
  model.save_pretrained(folder)
  ours = {n: lora_jax.import_peft(folder / n, base) for n in ("x", "b4", "b2")}
  return model, ours


def _peft_factors(model, module: str, name: str):
  target = model.base_model.model.get_submodule(module)
  if name in target.lora_A:
    a, b = target.lora_A[name].weight, target.lora_B[name].weight
  else:
    a, b = target.lora_embedding_A[name], target.lora_embedding_B[name]
  return a.detach().numpy().T, b.detach().numpy().T, target.scaling[name]


@pytest.mark.parametrize(
  "kind,names,svd_rank",
  [("linear", ("x", "b4"), None), ("cat", ("x", "b2"), None), ("svd", ("x", "b2"), 3)],
)
def test_combinations_equal_peft(peft_adapters, kind, names, svd_rank):
  model, ours = peft_adapters
  new = f"{kind}_{'_'.join(names)}"
  model.add_weighted_adapter(list(names), WEIGHTS, new, combination_type=kind, svd_rank=svd_rank)
  got = lora_jax.weighted_adapter(
    [ours[n] for n in names], WEIGHTS, combination_type=kind, svd_rank=svd_rank
  )
  for module in ("embed", "fc1", "fc2"):
    mine = got["params"][module]
    a, b, scale = _peft_factors(model, module, new)
    assert mine["lora_spec"].scale == scale == 1.0
    assert mine["lora_a"].shape == a.shape and mine["lora_b"].shape == b.shape, module
    if kind == "svd":  # singular vectors are unique up to sign: compare the updates
      want = (a @ b) * scale
      np.testing.assert_allclose(
        delta(mine["lora_spec"], mine["lora_a"], mine["lora_b"]), want, atol=1e-4, err_msg=module
      )
    else:
      np.testing.assert_allclose(mine["lora_a"], a, atol=1e-5, err_msg=module)
      np.testing.assert_allclose(mine["lora_b"], b, atol=1e-5, err_msg=module)


def test_cat_is_the_exact_weighted_sum_and_bad_input_is_named(peft_adapters):
  _, ours = peft_adapters
  one, two = ours["x"], ours["b2"]
  got = lora_jax.weighted_adapter([one, two], WEIGHTS, combination_type="cat")
  for module in ("fc1", "fc2"):
    parts = [
      w
      * delta(
        t["params"][module]["lora_spec"],
        t["params"][module]["lora_a"],
        t["params"][module]["lora_b"],
      )
      for t, w in zip((one, two), WEIGHTS, strict=True)
    ]
    m = got["params"][module]
    np.testing.assert_allclose(
      delta(m["lora_spec"], m["lora_a"], m["lora_b"]), sum(parts), atol=1e-5
    )
  with pytest.raises(ValueError, match=r"'linear' needs adapters of one rank, got ranks \[4, 2\]"):
    lora_jax.weighted_adapter([one, two], WEIGHTS, combination_type="linear")
  with pytest.raises(ValueError, match=r"combination_type='ties' is not one of"):
    lora_jax.weighted_adapter([one, two], WEIGHTS, combination_type="ties")
  with pytest.raises(ValueError, match="one weight per adapter: 2 adapters, 1 weights"):
    lora_jax.weighted_adapter([one, two], [1.0])
