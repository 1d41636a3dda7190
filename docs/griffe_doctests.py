"""A griffe extension for the API reference pages (mkdocs.yml loads it; not part of lora_jax).

The library's docstrings are Google style and show their doctests under ``Example:`` or in
plain text, which Markdown would read as nested block quotes (and ``x["key"]`` as a link).
This fences each run of ``>>>`` lines, with its expected output, as a ``pycon`` code block.
"""

from __future__ import annotations

import griffe

FENCE = "```"


def fence_doctests(text: str) -> str:
  """``text`` with every doctest run (prompts and output up to a blank line) fenced."""
  lines, out, i, in_fence = text.splitlines(), [], 0, False
  while i < len(lines):
    line = lines[i]
    stripped = line.lstrip()
    if stripped.startswith(FENCE):
      in_fence = not in_fence
    if in_fence or not stripped.startswith(">>>"):
      out.append(line)
      i += 1
      continue
    indent = line[: len(line) - len(stripped)]
    out.append(f"{indent}{FENCE}pycon")
    while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
      out.append(lines[i])
      i += 1
    out.append(f"{indent}{FENCE}")
  return "\n".join(out)


class DoctestFences(griffe.Extension):
  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = fence_doctests(obj.docstring.value)
