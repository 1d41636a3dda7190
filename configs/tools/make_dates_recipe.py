"""Writes the SmolLM2 recipe's instruction data (``configs/smollm2_dates/``).

Usage:
  python configs/tools/make_dates_recipe.py [OUT_DIR]   # default: configs/smollm2_dates

A small skill with a fixed answer format, which SmolLM2-135M-Instruct does not have untuned
(it answers "March 5, 2021" with times, words or the wrong order) and a short LoRA run teaches:
the user asks, in one of several phrasings and after up to seven sentences of context, for a
date in ISO 8601 form; the assistant answers with the date alone, ``2021-03-05``. Files
(committed; rerunning writes identical bytes):

* ``train.jsonl`` / ``validation.jsonl``: conversations (``messages``), run_clm's format;
* ``test.jsonl``: held-out ``prompt`` / ``completion`` pairs, run_clm's
  ``--generation_prompts_file``: greedy answers to them give ``samples_exact_match``.

No date is in two files.
"""

from __future__ import annotations

import json
import pathlib
import random
import sys

if __package__:  # imported as configs.tools.make_dates_recipe
  from .make_clm_quickstart import MONTHS
  from .make_clm_quickstart import all_dates
else:  # `python configs/tools/make_dates_recipe.py`: this folder is sys.path[0]
  from make_clm_quickstart import MONTHS
  from make_clm_quickstart import all_dates

SEED = 1
SPLITS = {"train": 1200, "validation": 100, "test": 100}
ORDINAL = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}
PHRASINGS = (
  "Write {Month} {day}, {year} as a date in YYYY-MM-DD format.",
  "Convert {day} {Month} {year} to ISO 8601 (YYYY-MM-DD).",
  "What is {Month} {day}{th}, {year} in the format YYYY-MM-DD?",
  "Reformat the date {m}/{day}/{year} (month/day/year) as YYYY-MM-DD.",
  "Give the ISO date for the {day}{th} of {Month} {year}.",
)


# Context before some requests, so the conversations vary in length as real instruction data
# does (59 to 163 tokens with SmolLM2's template): padding wastes what packing saves.
CONTEXT = (
  "I am sorting out the paperwork for our office move.",
  "My grandmother kept a diary and I am typing it up.",
  "The form only accepts one format and keeps rejecting what I enter.",
  "We are building a spreadsheet of every event the club has held.",
  "This is for a database import, so the format matters.",
  "A colleague wrote the date by hand on the back of an envelope.",
  "The old system stored dates as text and we are cleaning them up.",
  "I need it for the file name of a scanned letter.",
  "Please keep the answer short, I will paste it straight into a form.",
  "Our archive software sorts entries by their dates.",
  "The invoice came from a supplier abroad.",
  "I found this written on a photograph in the attic.",
)


def request(date, rng: random.Random) -> str:
  context = rng.sample(CONTEXT, rng.choice((0, 0, 1, 2, 3, 5, 7)))
  return " ".join([*context, _ask(date, rng)])


def _ask(date, rng: random.Random) -> str:
  return rng.choice(PHRASINGS).format(
    Month=MONTHS[date.month - 1].capitalize(),
    day=date.day,
    th=ORDINAL.get(date.day, "th"),
    year=date.year,
    m=date.month,
  )


def write(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  rng = random.Random(SEED)
  dates = rng.sample(all_dates(), sum(SPLITS.values()))
  at = 0
  for name, n in SPLITS.items():
    chosen, at = dates[at : at + n], at + n
    rows = []
    for d in chosen:
      prompt, answer = request(d, rng), d.isoformat()
      if name == "test":
        rows.append({"prompt": prompt, "completion": answer})
      else:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"messages": turns})
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
  write(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "configs/smollm2_dates"))
