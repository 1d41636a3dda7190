"""Which modules a rule (or a quantization) reaches: a pattern, minus an exclusion.

A :class:`Targets` is matched against the ``"a/b/c"`` path of the *module* holding a weight,
measured from the variables dict (``"params/encoder/layer/0/attention/self/query"``).
:func:`assign` gives each module to the first of several that matches it; a target that
matches nothing is an error.

Three spellings of ``pattern``, the last two for users coming from PEFT's ``target_modules``:

* a regex string, matched with ``re.fullmatch`` against the whole path;
* a list of module names, each matching any path that *ends* with it (``"output.dense"``, or
  ``"output/dense"``, matches ``.../attention/output/dense`` and ``.../output/dense``);
* ``"all-linear"``: every module whose weight is a linear ``kernel`` (two-dimensional, or
  declared linear by a layout), except a language model's output head (a module named
  ``lm_head``), which PEFT's ``"all-linear"`` leaves alone too.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from collections.abc import Sequence

ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head",)  # never matched by "all-linear", as in PEFT


def _names_regex(names: Sequence[str]) -> str:
  alternatives = "|".join(re.escape(n.replace(".", "/")) for n in names)
  return f"(?:.*/)?(?:{alternatives})"


def _normalize(value, owner: str, field: str):
  """A pattern spelling -> (hashable form, regex or None for all-linear)."""
  if isinstance(value, str):
    if value == ALL_LINEAR:
      return value, None
    try:
      re.compile(value)
    except re.error as e:
      raise ValueError(f"{owner} {field}={value!r} is not a valid regex: {e}") from None
    return value, value
  if isinstance(value, Sequence) and value and all(isinstance(n, str) and n for n in value):
    names = tuple(value)
    return names, _names_regex(names)
  raise ValueError(
    f"{owner} {field}={value!r} must be a regex string, a non-empty list of module names, "
    f"or {ALL_LINEAR!r}"
  )


@dataclasses.dataclass(frozen=True)
class Targets:
  """A ``pattern`` of modules, minus those ``exclude`` names (in the same spellings).

  ``owner`` names what the spelling came from in error messages (``"LoraRule"``).

  Example:
    >>> t = Targets(["query", "value"], exclude=["layer/0/attention/self/value"])
    >>> t.matches("params/layer/1/attention/self/value")
    True
    >>> t.matches("params/layer/0/attention/self/value")
    False
    >>> Targets("all-linear").matches("params/lm_head", linear=True)
    False
  """

  pattern: str | tuple[str, ...]
  exclude: str | tuple[str, ...] | None = None
  owner: str = dataclasses.field(default="Targets", compare=False, repr=False)

  def __post_init__(self):
    pattern, regex = _normalize(self.pattern, self.owner, "pattern")
    object.__setattr__(self, "pattern", pattern)
    object.__setattr__(self, "_regex", None if regex is None else re.compile(regex))
    if self.exclude is not None:
      exclude, xregex = _normalize(self.exclude, self.owner, "exclude")
      if xregex is None:
        raise ValueError(
          f"{self.owner} exclude={self.exclude!r}: {ALL_LINEAR!r} cannot be excluded"
        )
      object.__setattr__(self, "exclude", exclude)
      object.__setattr__(self, "_exclude", re.compile(xregex))
    else:
      object.__setattr__(self, "_exclude", None)

  @property
  def all_linear(self) -> bool:
    return self.pattern == ALL_LINEAR

  def matches(self, path: str, linear: bool = True) -> bool:
    """Whether the module at ``path`` is a target.

    ``linear`` says whether that module's weight is a linear kernel (used by ``all-linear``).
    """
    if self._exclude is not None and self._exclude.fullmatch(path):
      return False
    if self._regex is None:
      return linear and path.rsplit("/", 1)[-1] not in OUTPUT_HEADS
    return self._regex.fullmatch(path) is not None

  def each(self) -> tuple[str, ...]:
    """The separately checkable targets: each name of a name list, else the pattern itself."""
    return self.pattern if isinstance(self.pattern, tuple) else (self.pattern,)

  def describe(self) -> str:
    if isinstance(self.pattern, tuple):
      return "[" + ", ".join(repr(n) for n in self.pattern) + "]"
    return repr(self.pattern)


def assign(
  modules: Sequence[tuple[str, bool]],
  targets: Sequence[Targets],
  name: Callable[[int, str], str],
) -> dict[str, int]:
  """``{module path: index of the first of targets that matches it}``.

  ``modules`` are ``(path, linear)`` pairs. Every target (each name of a name list, checked
  without ``exclude``) must match some module.

  Raises:
    ValueError: ``"<name(i, target)> matches no module; closest module paths: [...]"``.
  """
  chosen: dict[str, int] = {}
  for path, linear in modules:
    for i, t in enumerate(targets):
      if t.matches(path, linear):
        chosen[path] = i
        break
  module_paths = [p for p, _ in modules]
  for i, t in enumerate(targets):
    for target in t.each():
      probe = t if len(t.each()) == 1 else Targets((target,))
      if not any(probe.matches(p, linear) for p, linear in modules):
        raise ValueError(
          f"{name(i, target)} matches no module; closest module paths: "
          f"{closest(target, module_paths)}"
        )
  return chosen


def closest(target: str, paths: Sequence[str], n: int = 5) -> list[str]:
  """The ``n`` paths most similar to ``target`` (for 'matched nothing' errors)."""
  key = target.replace(".", "/")

  def score(p: str) -> float:
    tail = "/".join(p.split("/")[-key.count("/") - 1 :])
    return max(
      difflib.SequenceMatcher(None, key, p).ratio(),
      difflib.SequenceMatcher(None, key, tail).ratio(),
    )

  return sorted(paths, key=score, reverse=True)[:n]
