"""lora_jax / PEFT ratios and the markdown table of a benchmark run."""

from __future__ import annotations

from collections.abc import Sequence


def _peft(rows: Sequence[dict], config: str, impl: str) -> dict | None:
  for r in rows:
    if r["side"] == "peft" and r["config"] == config and r["impl"] == impl and "error" not in r:
      return r
  return None


def _over_base(row: dict) -> float | None:
  if not row.get("mem_source", "").startswith("process RSS") or row.get("rss_base_gib") is None:
    return None
  return row["peak_mem_gib"] - row["rss_base_gib"]


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or b is None or b <= 0 else round(a / b, 3)


def add_ratios(rows: list[dict]) -> list[dict]:
  """Adds the lora_jax / PEFT ratios to each lora_jax row that has a PEFT counterpart.

  ``speed_vs_peft_<impl>``: lora_jax tokens/s over PEFT's at the median step (above 1: faster);
  ``speed_vs_peft_<impl>_min``: the same from each side's fastest step, which a busy shared CPU
  disturbs less; ``mem_vs_peft_<impl>``: peak memory over PEFT's (below 1: less); on CPU also
  ``mem_over_base_vs_peft_<impl>``: the same for the RSS growth above what the process held
  after importing its framework (JAX and PyTorch start from different resident sizes).
  """
  for row in rows:
    if row["side"] != "lora_jax" or "error" in row:
      continue
    for impl, key in (("eager", "eager"), ("torch.compile", "compile")):
      peft = _peft(rows, row["config"], impl)
      if peft is None:
        continue
      row[f"speed_vs_peft_{key}"] = _ratio(row["tokens_per_s"], peft["tokens_per_s"])
      row[f"speed_vs_peft_{key}_min"] = _ratio(peft["step_ms_min"], row["step_ms_min"])
      row[f"mem_vs_peft_{key}"] = _ratio(row["peak_mem_gib"], peft["peak_mem_gib"])
      over = _ratio(_over_base(row), _over_base(peft))
      if over is not None:
        row[f"mem_over_base_vs_peft_{key}"] = over
  return rows


def _fmt(x, digits: int = 2) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:,.{digits}f}" if abs(x) < 1e4 else f"{x:,.0f}"
  return str(x)


def _pair(row: dict, a: str, b: str) -> str | None:
  if row.get(a) is None and row.get(b) is None:
    return None
  return f"{_fmt(row.get(a))} / {_fmt(row.get(b))}"


# (header, cell of a row); ratios are on lora_jax rows only.
COLUMNS = (
  ("config", lambda r: r["config"]),
  ("side", lambda r: r["side"]),
  ("impl", lambda r: r["impl"]),
  ("step ms (median)", lambda r: _fmt(r.get("step_ms"), 1)),
  ("step ms (min)", lambda r: _fmt(r.get("step_ms_min"), 1)),
  ("tokens/s", lambda r: _fmt(r.get("tokens_per_s"), 0)),
  ("compile s", lambda r: _fmt(r.get("compile_s"), 1)),
  ("peak mem GiB", lambda r: _fmt(r.get("peak_mem_gib"), 3)),
  ("RSS over base GiB", lambda r: _fmt(_over_base(r), 3)),
  ("XLA step GiB", lambda r: _fmt(r.get("xla_step_gib"), 3)),
  ("model TFLOP/s", lambda r: _fmt(r.get("model_tflops_per_s"), 3)),
  ("MFU", lambda r: _fmt(r.get("mfu"), 3)),
  ("XLA / model FLOPs", lambda r: _fmt(r.get("xla_over_model_flops"), 2)),
  (
    "speed vs PEFT eager (median / min)",
    lambda r: _pair(r, "speed_vs_peft_eager", "speed_vs_peft_eager_min"),
  ),
  (
    "speed vs PEFT compile (median / min)",
    lambda r: _pair(r, "speed_vs_peft_compile", "speed_vs_peft_compile_min"),
  ),
  (
    "mem vs PEFT eager (peak / over base)",
    lambda r: _pair(r, "mem_vs_peft_eager", "mem_over_base_vs_peft_eager"),
  ),
)


def markdown(rows: Sequence[dict]) -> str:
  """One table row per result; a failed run shows its error in place of the figures."""
  lines = [
    "| " + " | ".join(h for h, _ in COLUMNS) + " |",
    "|" + " --- |" * len(COLUMNS),
  ]
  for r in rows:
    if "error" in r:
      cells = [r["config"], r["side"], r["impl"], "error: " + r["error"].replace("|", "/")[:120]]
      cells += [""] * (len(COLUMNS) - len(cells))
    else:
      cells = [cell(r) or "-" for _, cell in COLUMNS]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)
