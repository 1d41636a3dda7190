"""Greedy samples of fixed prompts during a causal-LM run (``samples.jsonl``), scored against
their expected answers when the prompts file gives them."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np

import lora_jax
from lora_jax import models
from lora_jax.models.decoder.generate import prompt_bucket
from train.data import clm as clm_data
from train.engine import outputs

logger = logging.getLogger(__name__)

SAMPLES = "samples.jsonl"


def read_prompts(path: str, adapter_column: str | None = None,
                 adapters: tuple[str, ...] | None = None):  # fmt: skip
  """``(prompts, references or None, adapter ids or None)`` of ``--generation_prompts_file``.

  One prompt per line; or JSONL rows with ``"prompt"`` and, on every row or none,
  ``"completion"`` (the expected answer: samples then get an exact-match score). With
  ``adapter_column`` (a run training the bank ``adapters``), JSONL rows whose
  ``adapter_column`` field names the adapter that answers them: their indices are returned.
  """
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"--generation_prompts_file {path!r} does not exist")
  if adapter_column and file.suffix != ".jsonl":
    raise ValueError(
      f"--generation_prompts_file {path!r}: with --adapter_column each prompt names its adapter, "
      f"so the prompts are a .jsonl file with 'prompt' and {adapter_column!r} fields"
    )
  prompts, references, names = [], [], []
  for i, line in enumerate(file.read_text().splitlines()):
    if not line.strip():
      continue
    if file.suffix != ".jsonl":
      prompts.append(line)
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:  # its own "line 1" is the line's, not the file's
      raise ValueError(
        f"--generation_prompts_file {path!r}: line {i + 1} is not JSON ({e.msg} at column "
        f"{e.colno}); each line of a .jsonl file is one object with a 'prompt'"
      ) from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
      raise ValueError(
        f"--generation_prompts_file {path!r}: line {i + 1} has no string 'prompt' field"
      )
    prompts.append(row["prompt"])
    if adapter_column:
      names.append(row.get(adapter_column))
    if "completion" in row:
      references.append(str(row["completion"]))
  if not prompts:
    raise ValueError(f"--generation_prompts_file {path!r} holds no prompt")
  if references and len(references) != len(prompts):
    raise ValueError(f"{path}: some rows have a 'completion' and some do not")
  ids = None
  if adapter_column:
    ids = clm_data.adapter_ids(names, adapters, adapter_column,
                               f"--generation_prompts_file {path!r}")[1]  # fmt: skip
  return prompts, references or None, ids


@dataclasses.dataclass
class Sampler:
  """Greedy answers to fixed prompts, from the current adapters (``samples.jsonl``)."""

  module: Any
  base: Any  # the frozen half, on the host side
  prompts: list[str]
  references: list[str] | None
  prompt_ids: list[list[int]]
  tokenizer: Any
  max_new_tokens: int
  path: pathlib.Path
  adapter_ids: np.ndarray | None = None  # each prompt's adapter in the bank (--adapter_column)

  def __call__(self, step: int, trainable_host) -> dict[str, float]:
    """Writes this step's samples; returns ``samples_exact_match`` when references exist."""
    params = lora_jax.combine(trainable_host, self.base)
    # one call per length bucket: a short prompt is not padded to the longest one's bucket
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(self.prompt_ids):
      groups.setdefault(prompt_bucket(len(ids)), []).append(i)
    out: list[list[int]] = [[] for _ in self.prompt_ids]
    for members in groups.values():
      new_tokens = models.generate(
        self.module,
        params,
        [self.prompt_ids[i] for i in members],
        max_new_tokens=self.max_new_tokens,
        eos_token_id=self.tokenizer.eos_token_id,
        **({} if self.adapter_ids is None else {"adapter_ids": self.adapter_ids[members]}),
      )
      for i, tokens in zip(members, new_tokens, strict=True):
        out[i] = tokens
    texts = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out]
    pairs = zip(self.prompts, texts, strict=True)
    new = [{"step": step, "prompt": p, "generation": t} for p, t in pairs]
    if self.adapter_ids is not None:
      names = lora_jax.bank_names(params)
      for row, i in zip(new, self.adapter_ids, strict=True):
        row["adapter"] = names[i]
    metrics = {}
    if self.references is not None:
      for row, ref in zip(new, self.references, strict=True):
        row["completion"], row["exact_match"] = ref, row["generation"] == ref.strip()
      metrics["samples_exact_match"] = float(np.mean([r["exact_match"] for r in new]))
    for row in new:
      logger.info(
        "sample at step %d: %r -> %r%s", step, row["prompt"], row["generation"],
        "" if "exact_match" not in row else f" (expected {row['completion']!r})",
      )  # fmt: skip
    if jax.process_index() == 0:
      # rows of this step or later are from an interrupted run that this one replays
      rows = outputs.read_jsonl(self.path) if self.path.exists() else []
      outputs.write_jsonl(self.path, [r for r in rows if r["step"] < step] + new)
    return metrics
