"""train/generate.py: rows with different adapters in one batch give each adapter's own
generation (as lora_jax.models.generate gives it with that adapter alone); bad rows are one line."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import transformers

import lora_jax
from lora_jax.models import export_merged
from lora_jax.models import from_config
from lora_jax.models import generate
from train import generate as cli

QUICKSTART = pathlib.Path(__file__).resolve().parent.parent / "configs" / "clm_quickstart"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A small random Llama with the quickstart's tokenizer, and two PEFT adapters of it."""
  root = tmp_path_factory.mktemp("gen")
  config = transformers.AutoConfig.from_pretrained(QUICKSTART)
  tokenizer = transformers.AutoTokenizer.from_pretrained(QUICKSTART)
  module, variables = from_config(config, "causal-lm", rng=0)
  export_merged(root / "base", variables, config=config, tokenizer=tokenizer)
  adapters = {}
  for i, (name, targets) in enumerate({"fr": ["q_proj", "v_proj"], "de": ["up_proj"]}.items()):
    t = lora_jax.lora_init(
      variables,
      lora_jax.LoraRule(targets, rank=4, alpha=8),
      rng=jax.random.key(i),
      layouts=lora_jax.kernel_layouts(module, jax.numpy.ones((1, 2), jax.numpy.int32)),
    )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(t)
    rng = np.random.RandomState(i)
    t = jax.tree_util.tree_unflatten(
      treedef,
      [
        (0.5 * rng.randn(*x.shape)).astype(np.float32)
        if jax.tree_util.keystr(kp).endswith("['lora_b']")
        else x
        for kp, x in leaves
      ],
    )
    lora_jax.export_peft(
      root / name,
      t,
      base_model_name_or_path=str(root / "base"),
      config=config,
      task_type="CAUSAL_LM",
    )
    adapters[name] = t
  return root, module, variables, tokenizer, adapters


def test_each_row_gets_its_own_adapters_generation(setup, tmp_path):
  root, module, variables, tokenizer, adapters = setup
  rows = [
    {"prompt": "five may", "adapter": "fr"},
    {"prompt": "five may", "adapter": "de"},
    {"prompt": "five may"},
    {"messages": [{"role": "user", "content": "one june"}], "adapter": "fr"},
  ]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  code = cli.main([
    "--model_name_or_path", str(root / "base"), "--adapter", f"fr={root / 'fr'}",
    "--adapter", f"de={root / 'de'}", "--input", str(tmp_path / "in.jsonl"),
    "--output", str(tmp_path / "out.jsonl"), "--max_new_tokens", "5", "--batch_size", "3",
  ])  # fmt: skip
  assert code == 0
  out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert [{k: v for k, v in r.items() if k != "generation"} for r in out] == rows
  eos = transformers.AutoConfig.from_pretrained(root / "base").eos_token_id
  for row, got in zip(rows, out, strict=True):
    params = variables if "adapter" not in row else adapters[row["adapter"]]
    prompt = cli._token_ids(tokenizer, row)
    want = generate(module, params, [prompt], max_new_tokens=5, eos_token_id=eos)[0]
    assert got["generation"] == tokenizer.decode(want, skip_special_tokens=True), row
  assert len({r["generation"] for r in out[:3]}) > 1  # the adapters change the text


def test_a_bad_row_or_flag_is_one_line(setup, tmp_path, capsys):
  root = setup[0]
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "x", "adapter": "es"}) + "\n")
  args = ["--model_name_or_path", str(root / "base"), "--adapter", f"fr={root / 'fr'}"]
  assert cli.main([*args, "--input", str(tmp_path / "in.jsonl")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "names adapter 'es'; the --adapter names are ['fr']" in err
  assert cli.main([*args, "--input", str(tmp_path / "missing.jsonl")]) == 2
  assert "is not a file" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    cli.main([*args, "--adapter", "nopath", "--input", "x"])
  assert e.value.code == 2 and "must be NAME=PATH" in capsys.readouterr().err


def test_runs_as_the_docs_run_it_by_its_path_from_anywhere(tmp_path):
  """``python train/generate.py ...`` from another folder: the script makes the repository
  importable before its first ``train`` import (ruff's import sorting once moved one above)."""
  script = QUICKSTART.parent.parent / "train" / "generate.py"
  proc = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)  # fmt: skip
  assert proc.returncode == 0 and "--adapter" in proc.stdout, proc.stderr[-2000:]


def test_chat_asks_a_prompt_row_as_a_user_turn(setup, tmp_path):
  """``--chat``: a ``prompt`` row generates what the same text as a ``messages`` user turn
  generates without it (run_clm.py's prompts of a chat-trained model are asked so)."""
  root = setup[0]
  base = ["--model_name_or_path", str(root / "base"), "--adapter", f"fr={root / 'fr'}",
          "--max_new_tokens", "5"]  # fmt: skip
  texts = {}
  for kind, row, extra in (
    ("chat", {"prompt": "one june", "adapter": "fr"}, ["--chat"]),
    ("messages", {"messages": [{"role": "user", "content": "one june"}], "adapter": "fr"}, []),
    ("plain", {"prompt": "one june", "adapter": "fr"}, []),
  ):
    (tmp_path / f"{kind}.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / f"{kind}.out.jsonl"
    assert (
      cli.main([*base, *extra, "--input", str(tmp_path / f"{kind}.jsonl"), "--output", str(out)])
      == 0
    )
    texts[kind] = json.loads(out.read_text())["generation"]
  assert texts["chat"] == texts["messages"] != texts["plain"], texts


def test_chat_without_a_chat_template_is_one_line(setup, tmp_path, capsys):
  plain = tmp_path / "base"
  shutil.copytree(setup[0] / "base", plain)
  config = json.loads((plain / "tokenizer_config.json").read_text())
  config.pop("chat_template", None)
  (plain / "tokenizer_config.json").write_text(json.dumps(config))
  for f in plain.glob("chat_template.*"):
    f.unlink()
  (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "one june"}) + "\n")
  argv = ["--model_name_or_path", str(plain), "--chat", "--input", str(tmp_path / "in.jsonl")]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--chat: the tokenizer of" in err and "no chat template" in err
