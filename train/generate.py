"""Batch generation with several LoRA adapters over one base, each row through its own.

  python train/generate.py --model_name_or_path MODEL --adapter fr=PEFT_DIR --adapter de=PEFT_DIR \\
      --input prompts.jsonl --output generations.jsonl

Each input row is a JSON object with ``"prompt"`` (text; with ``--chat`` a user turn) or
``"messages"`` (a chat), chats rendered with the tokenizer's chat template and its generation
prompt, and ``"adapter"``: one of the
``--adapter`` names, or ``null`` / absent for the base model alone. The adapters (PEFT folders,
as ``run_clm.py`` writes them or PEFT's ``save_pretrained``) are held in one adapter bank
(:func:`lora_jax.adapter_bank`), and the rows decode ``--batch_size`` at a time whatever their
adapters: one compiled program for any mix. Each output row is the input row plus
``"generation"`` (the new text). Bad input ends in one line naming it, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

if __package__ in (None, ""):  # `python train/generate.py`: make the repository root importable
  sys.path[0] = str(pathlib.Path(__file__).resolve().parent.parent)

from train.data import clm as clm_data  # noqa: E402  (light: no jax, no transformers)
from train.engine.errors import first_line  # noqa: E402

NAME = "generate.py"


class Refused(ValueError):
  """Bad input: the message is the one line the script prints."""


def _adapter_flag(value: str) -> tuple[str, str]:
  name, sep, path = value.partition("=")
  if not sep or not name or not path:
    raise argparse.ArgumentTypeError(f"--adapter {value!r} must be NAME=PATH (a PEFT folder)")
  return name, path


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
  p.add_argument("--model_name_or_path", required=True, help="the base model (folder or Hub id)")
  p.add_argument(
    "--adapter", action="append", type=_adapter_flag, default=[], metavar="NAME=PATH",
    help="a PEFT adapter folder under a name the input rows use (repeat for several)",
  )  # fmt: skip
  p.add_argument("--input", required=True, help="JSONL: prompt or messages, and adapter")
  p.add_argument("--output", default="-", help="JSONL out ('-': standard output)")
  p.add_argument(
    "--chat", action="store_true",
    help="ask each 'prompt' row as a user turn through the tokenizer's chat template, as "
    "run_clm.py asks its prompts of a model trained on chats ('messages' rows always are)",
  )  # fmt: skip
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  names = [n for n, _ in args.adapter]
  if len(set(names)) != len(names):
    p.error(f"--adapter names must differ, got {names}")
  for flag in ("max_new_tokens", "batch_size"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag} {getattr(args, flag)} must be at least 1")
  return args


def read_rows(path: str, names: list[str]) -> list[dict]:
  """The input rows, each checked: a prompt or messages, and a known adapter (or none)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise Refused(f"--input {path!r} is not a file")
  rows = []
  for n, line in enumerate(file.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise Refused(f"{path} line {n} is not JSON: {e.msg}") from None
    if not isinstance(row, dict) or not (
      isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)
    ):
      raise Refused(f"{path} line {n} needs a 'prompt' string or a 'messages' list")
    adapter = row.get("adapter")
    if adapter is not None and adapter not in names:
      raise Refused(
        f"{path} line {n} names adapter {adapter!r}; the --adapter names are {names} (or null "
        "for the base model)"
      )
    rows.append(row)
  if not rows:
    raise Refused(f"--input {path!r} holds no rows")
  return rows


def _token_ids(tokenizer, row: dict, chat: bool = False) -> list[int]:
  if "messages" in row or chat:
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    return [int(t) for t in clm_data.render(tokenizer, messages, add_generation_prompt=True)]
  return [int(t) for t in tokenizer(row["prompt"])["input_ids"]]


def run(args) -> list[dict]:
  import jax
  import transformers

  import lora_jax
  from lora_jax.models import from_pretrained
  from lora_jax.models import generate

  names = [n for n, _ in args.adapter]
  rows = read_rows(args.input, names)
  module, variables = from_pretrained(args.model_name_or_path)
  config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_name_or_path)
  if args.chat and not getattr(tokenizer, "chat_template", None):
    raise Refused(
      f"--chat: the tokenizer of {args.model_name_or_path!r} has no chat template; leave --chat "
      "out to tokenize the prompts as plain text"
    )
  params = variables
  if names:
    params = lora_jax.adapter_bank(
      {n: lora_jax.import_peft(path, variables, config=config) for n, path in args.adapter}
    )
  eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
  rng = jax.random.key(args.seed)
  out = []
  for start in range(0, len(rows), args.batch_size):
    batch = rows[start : start + args.batch_size]
    prompts = [_token_ids(tokenizer, r, args.chat) for r in batch]
    ids = [-1 if r.get("adapter") is None else names.index(r["adapter"]) for r in batch]
    rng, key = jax.random.split(rng)
    new = generate(
      module,
      params,
      prompts,
      max_new_tokens=args.max_new_tokens,
      eos_token_id=eos,
      temperature=args.temperature,
      top_k=args.top_k,
      top_p=args.top_p,
      rng=key,
      adapter_ids=ids if names else None,
    )
    for row, tokens in zip(batch, new, strict=True):
      out.append({**row, "generation": tokenizer.decode(tokens, skip_special_tokens=True)})
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    rows = run(args)
  except (ValueError, OSError) as e:
    why = first_line(e)
    print(f"{NAME}: error: {why}", file=sys.stderr)
    return 2
  text = "".join(json.dumps(r) + "\n" for r in rows)
  if args.output == "-":
    sys.stdout.write(text)
  else:
    pathlib.Path(args.output).write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
