"""Writes the quickstart's model config, tokenizer and data (``configs/quickstart/``).

Usage:
  python configs/tools/make_quickstart.py [OUT_DIR]   # default: configs/quickstart

The files are committed, so ``python train/run_glue.py --config configs/quickstart.yaml`` needs
nothing else (no network, no Hub, no torch). This script is how they were made; rerunning it
writes byte-identical files (``tests/test_quickstart.py`` checks that).

* ``config.json``: a small BERT (2 layers, hidden 64) whose vocabulary is the task's words.
  ``run_glue.py --config_name`` builds it with random weights (no checkpoint exists).
* ``vocab.txt`` + ``tokenizer_config.json``: a WordPiece tokenizer
  (``transformers.AutoTokenizer.from_pretrained`` loads it offline) in which every word of the
  task is one token.
* ``train.tsv`` / ``validation.tsv`` (``sentence<TAB>label``) and ``test.tsv``
  (``index<TAB>sentence``), in GLUE SST-2's format: a synthetic sentiment task. Sentences come
  from templates around one positive or negative word ("the plot was really clever .",
  "i never enjoyed this film ."); negation ("not", "never") flips the label, so a bag of words
  is not enough. Labels are balanced (1 = positive); no sentence is in two splits.
"""

from __future__ import annotations

import json
import pathlib
import random
import sys

SEED = 0
SPLITS = {"train": 4000, "validation": 500, "test": 500}
NEGATION_RATE = 0.3
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

POSITIVE = (
  "good great excellent wonderful brilliant superb fun charming delightful moving clever "
  "beautiful enjoyable fantastic amazing funny lovely touching fresh gripping smart solid "
  "pleasant impressive memorable"
).split()
NEGATIVE = (
  "bad awful terrible boring dull poor weak bland tedious clumsy messy lifeless painful "
  "annoying stupid forgettable dreadful horrible flat silly slow predictable lazy ugly "
  "disappointing"
).split()
# (past tense, base form) of verbs of liking and disliking: "i loved", "i did not love".
POSITIVE_VERBS = (("loved", "love"), ("enjoyed", "enjoy"), ("liked", "like"), ("adored", "adore"))
NEGATIVE_VERBS = (("hated", "hate"), ("disliked", "dislike"), ("despised", "despise"))
NOUNS = (
  "movie film story plot acting ending script cast soundtrack dialogue music direction pacing "
  "sequel performance show series book novel album song game meal service hotel"
).split()
DETERMINERS = ("the", "this", "that", "their")
NEUTRAL = ("new", "long", "short", "old", "french", "recent", "second", "latest", "first")
# A copula and its negated forms: "the plot was clever", "the plot did not feel clever".
COPULAS = (
  ("is", ("is not", "is never")),
  ("was", ("was not", "was never")),
  ("seems", ("does not seem", "never seems")),
  ("felt", ("did not feel", "never felt")),
  ("looked", ("did not look", "never looked")),
  ("sounded", ("did not sound", "never sounded")),
)
INTENSIFIERS = ("very", "really", "quite", "rather", "truly", "so", "pretty", "extremely")
SUBJECTS = ("i", "we", "my friends", "the critics", "everyone", "my brother")
OPENERS = (
  "to be honest ,",
  "in my opinion ,",
  "overall ,",
  "frankly ,",
  "i think",
  "honestly ,",
  "in the end ,",
  "all in all ,",
  "if you ask me ,",
)
CLOSERS = (
  "from start to finish",
  "at times",
  "for the most part",
  "in every way",
  "this time",
  "as expected",
  "to me",
  "after all",
)


def _maybe(rng: random.Random, p: float, words) -> list[str]:
  return [rng.choice(words)] if rng.random() < p else []


def _noun_phrase(rng: random.Random) -> list[str]:
  return [rng.choice(DETERMINERS), *_maybe(rng, 0.3, NEUTRAL), rng.choice(NOUNS)]


def sentence(rng: random.Random) -> tuple[str, int]:
  """One sentence and its label (1 = positive, 0 = negative)."""
  positive = rng.random() < 0.5
  negated = rng.random() < NEGATION_RATE
  word_positive = positive != negated  # negation flips the sentiment word's polarity
  if rng.random() < 0.7:  # "the plot was not very clever"
    adjective = rng.choice(POSITIVE if word_positive else NEGATIVE)
    plain, negated_forms = rng.choice(COPULAS)
    words = [
      *_noun_phrase(rng),
      *(rng.choice(negated_forms).split() if negated else [plain]),
      *_maybe(rng, 0.4, INTENSIFIERS),
      adjective,
    ]
  else:  # "my friends never enjoyed this film", "i did not like the plot"
    past, base = rng.choice(POSITIVE_VERBS if word_positive else NEGATIVE_VERBS)
    if negated:
      verb = ["never", past] if rng.random() < 0.5 else ["did", "not", base]
    else:
      verb = [past]
    words = [*rng.choice(SUBJECTS).split(), *verb, *_noun_phrase(rng)]
  opener = _maybe(rng, 0.25, OPENERS)
  closer = _maybe(rng, 0.25, CLOSERS)
  text = " ".join([*opener, *words, *closer, "."])
  return text, int(positive)


def vocabulary() -> list[str]:
  """The special tokens, then every word the templates use, sorted."""
  groups = [POSITIVE, NEGATIVE, NOUNS, DETERMINERS, NEUTRAL, INTENSIFIERS, SUBJECTS, OPENERS]
  groups += [CLOSERS, [c for plain, forms in COPULAS for c in (plain, *forms)], ("did", "not", ".")]
  groups += [[w for pair in POSITIVE_VERBS + NEGATIVE_VERBS for w in pair]]
  words = {w for group in groups for phrase in group for w in phrase.split()}
  return [*SPECIAL_TOKENS, *sorted(words)]


def model_config(vocab_size: int) -> dict:
  """A small BERT for sequence classification, in transformers' ``config.json`` format."""
  return {
    "architectures": ["BertForSequenceClassification"],
    "model_type": "bert",
    "vocab_size": vocab_size,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 64,
    "type_vocab_size": 2,
    "initializer_range": 0.1,  # not BERT's 0.02: random layers that pass signals on (LoRA only)
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "id2label": {"0": "negative", "1": "positive"},
    "label2id": {"negative": 0, "positive": 1},
  }


TOKENIZER_CONFIG = {
  "tokenizer_class": "BertTokenizer",
  "do_lower_case": True,
  "model_max_length": 64,
  "unk_token": "[UNK]",
  "sep_token": "[SEP]",
  "pad_token": "[PAD]",
  "cls_token": "[CLS]",
  "mask_token": "[MASK]",
}


def splits(seed: int = SEED) -> dict[str, list[tuple[str, int]]]:
  """``SPLITS`` rows each of distinct sentences (no sentence in two splits)."""
  rng = random.Random(seed)
  seen: set[str] = set()
  out: dict[str, list[tuple[str, int]]] = {}
  for name, size in SPLITS.items():
    rows: list[tuple[str, int]] = []
    while len(rows) < size:
      text, label = sentence(rng)
      if text not in seen:
        seen.add(text)
        rows.append((text, label))
    out[name] = rows
  return out


def _json(data: dict) -> str:
  return json.dumps(data, indent=2) + "\n"


def write(out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes every quickstart file to ``out_dir`` (created if needed); returns their paths."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  vocab = vocabulary()
  data = splits()
  files = {
    "config.json": _json(model_config(len(vocab))),
    "vocab.txt": "".join(f"{w}\n" for w in vocab),
    "tokenizer_config.json": _json(TOKENIZER_CONFIG),
    "train.tsv": "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in data["train"]),
    "validation.tsv": "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in data["validation"]),
    "test.tsv": "index\tsentence\n"
    + "".join(f"{i}\t{s}\n" for i, (s, _) in enumerate(data["test"])),
  }
  paths = []
  for name, text in files.items():
    path = out / name
    path.write_text(text, encoding="utf-8", newline="\n")
    paths.append(path)
  return paths


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    print(f"usage: make_quickstart.py [OUT_DIR]; got {len(argv)} arguments", file=sys.stderr)
    return 2
  default = pathlib.Path(__file__).resolve().parent.parent / "quickstart"
  for path in write(argv[0] if argv else default):
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
