"""One-line errors: what the scripts print of an exception."""

from __future__ import annotations


def first_line(error: BaseException, limit: int | None = None) -> str:
  """``error``'s message up to its first line break (its type's name if it has no message),
  cut to ``limit`` characters if given.

  Example:
    >>> first_line(ValueError("bad value\\n  details..."))
    'bad value'
    >>> first_line(KeyError())
    'KeyError'
  """
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if limit is None else line[:limit]
