"""Writes the causal-LM quickstart's model config, tokenizer and data (``configs/clm_quickstart/``).

Usage:
  python configs/tools/make_clm_quickstart.py [OUT_DIR]   # default: configs/clm_quickstart

The files are committed, so ``python train/run_clm.py --config configs/clm_quickstart.yaml``
needs nothing else (no network, no Hub, no torch). Rerunning this script writes byte-identical
files (``tests/test_clm_quickstart.py`` checks that).

* ``config.json``: a small Llama (2 layers, hidden 128, 4 / 2 heads, tied embeddings) whose
  vocabulary is the task's words; ``run_clm.py --config_name`` builds it with random weights.
* ``vocab.txt`` + ``tokenizer_config.json``: a word-level (WordPiece) tokenizer in which every
  word of the task is one token, with a chat template: ``user : ... [SEP] assistant : ...
  [SEP]`` (``[SEP]`` ends a turn and is the end-of-sequence token).
* ``train.jsonl`` / ``validation.jsonl``: conversations in which the user asks, in one of a
  few phrasings, for a date written in words ("write march 5 , 2021 as a date") and the
  assistant answers in ISO form ("2021 - 03 - 05"): copy the year, look up the month's number,
  pad the day. No date is in two splits, so the validation loss measures the rule, not recall.
* ``prompts.txt``: four held-out requests, sampled during training (``samples.jsonl``).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import random
import sys

if __package__:  # imported as configs.tools.make_clm_quickstart
  from .make_quickstart import TOKENIZER_CONFIG
else:  # `python configs/tools/make_clm_quickstart.py`: this folder is sys.path[0]
  from make_quickstart import TOKENIZER_CONFIG

SEED = 0
SPLITS = {"train": 2000, "validation": 200}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MONTHS = (
  "january february march april may june july august september october november december"
).split()
YEARS = range(1990, 2030)
PHRASINGS = (
  "write {month} {day} , {year} as a date",
  "format the date {day} {month} {year}",
  "{month} {day} {year} in iso format please",
  "what is {day} {month} , {year} as a date",
)
CHAT_TEMPLATE = (
  "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} [SEP] "
  "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"
)


def answer(date: datetime.date) -> str:
  """The ISO form, one token per part: ``"2021 - 03 - 05"``."""
  return f"{date.year} - {date.month:02d} - {date.day:02d}"


def request(date: datetime.date, rng: random.Random) -> str:
  phrasing = rng.choice(PHRASINGS)
  return phrasing.format(month=MONTHS[date.month - 1], day=date.day, year=date.year)


def all_dates() -> list[datetime.date]:
  first, last = datetime.date(YEARS[0], 1, 1), datetime.date(YEARS[-1], 12, 31)
  return [first + datetime.timedelta(days=d) for d in range((last - first).days + 1)]


def vocabulary() -> list[str]:
  words = {"-", ",", ":", "user", "assistant", "system"}
  for phrasing in PHRASINGS:
    words |= {w for w in phrasing.split() if not w.startswith("{")}
  words |= set(MONTHS) | {str(y) for y in YEARS}
  words |= {str(d) for d in range(1, 32)} | {f"{d:02d}" for d in range(1, 32)}
  return [*SPECIAL_TOKENS, *sorted(words)]


def conversations(dates, rng: random.Random) -> list[dict]:
  return [
    {
      "messages": [
        {"role": "user", "content": request(d, rng)},
        {"role": "assistant", "content": answer(d)},
      ]
    }
    for d in dates
  ]


def write(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  rng = random.Random(SEED)
  dates = rng.sample(all_dates(), sum(SPLITS.values()) + 4)
  splits = {"train": dates[: SPLITS["train"]], "validation": dates[SPLITS["train"] : -4]}
  for name, chosen in splits.items():
    rows = conversations(chosen, rng)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (out / "prompts.txt").write_text("".join(request(d, rng) + "\n" for d in dates[-4:]))
  vocab = vocabulary()
  (out / "vocab.txt").write_text("".join(w + "\n" for w in vocab))
  tokenizer = {**TOKENIZER_CONFIG, "eos_token": "[SEP]", "chat_template": CHAT_TEMPLATE}
  (out / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2) + "\n")
  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": len(vocab),
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "pad_token_id": 0,
    "eos_token_id": 3,
    "bos_token_id": 2,
  }
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
  write(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "configs/clm_quickstart"))
