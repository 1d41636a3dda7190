"""Which modules get an adapter, and with what rank, alpha and dropout.

A :class:`LoraRule` is matched against the ``"a/b/c"`` path of the *module* holding a weight,
measured from the variables dict (``"params/encoder/layer/0/attention/self/query"``). The first
rule that matches a module decides its adapter; a rule that matches nothing is an error.

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
import math
import numbers
import re
from collections.abc import Sequence

from lora_jax._src import dropout as dropout_masks

ALL_LINEAR = "all-linear"
OUTPUT_HEADS = ("lm_head",)  # never matched by "all-linear", as in PEFT
INITS = ("gaussian", "kaiming_uniform", "pissa", "pissa_niter_K", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")  # "pissa_niter_K": K a positive int


def _finite(value) -> bool:
  """A real number (not a bool), neither inf nor NaN."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _names_regex(names: Sequence[str]) -> str:
  alternatives = "|".join(re.escape(n.replace(".", "/")) for n in names)
  return f"(?:.*/)?(?:{alternatives})"


def _normalize(value, field: str):
  """A pattern spelling -> (hashable form, regex or None for all-linear)."""
  if isinstance(value, str):
    if value == ALL_LINEAR:
      return value, None
    try:
      re.compile(value)
    except re.error as e:
      raise ValueError(f"LoraRule {field}={value!r} is not a valid regex: {e}") from None
    return value, value
  if isinstance(value, Sequence) and value and all(isinstance(n, str) and n for n in value):
    names = tuple(value)
    return names, _names_regex(names)
  raise ValueError(
    f"LoraRule {field}={value!r} must be a regex string, a non-empty list of module names, "
    f"or {ALL_LINEAR!r}"
  )


@dataclasses.dataclass(frozen=True)
class LoraRule:
  """One ``(pattern -> adapter settings)`` rule.

  Args:
    pattern: regex over module paths, a list of PEFT-style module names, or ``"all-linear"``.
    rank: adapter rank ``r`` (> 0).
    alpha: LoRA alpha (finite, > 0); ``None`` means ``alpha = rank`` (scale 1).
    dropout: LoRA dropout on the adapter input, in ``[0, 1)``.
    rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of ``alpha / rank``.
    init: ``"gaussian"`` (A ~ N(0, 1/rank^2), as PEFT's ``init_lora_weights="gaussian"``) or
      ``"kaiming_uniform"`` (PEFT's default for linear layers). B starts at zero either way.
      ``"pissa"`` (top-``r`` singular triplets of the weight), ``"pissa_niter_K"`` (the same by
      a randomized SVD with ``K`` subspace iterations) and ``"olora"`` (QR of the weight), as
      PEFT's ``init_lora_weights``, start from the weight itself and replace it by the residual
      (linear kernels only; see :mod:`lora_jax._src.svd_init`).
    exclude: modules never adapted by this rule, in the same spellings as ``pattern``.
    use_dora: DoRA (PEFT's ``use_dora``): a trainable magnitude per output unit beside ``A``
      and ``B`` (linear kernels only: ``nn.Dense``/``nn.DenseGeneral``; see
      :mod:`lora_jax._src.dora`).

  Example:
    >>> from lora_jax import LoraRule
    >>> rule = LoraRule(["query", "value"], rank=8, alpha=16)
    >>> rule.scale, rule.matches("params/encoder/layer/0/attention/self/value")
    (2.0, True)
    >>> LoraRule("params/.*/query", rank=0)
    Traceback (most recent call last):
    ...
    ValueError: LoraRule rank=0 must be a positive integer
  """

  pattern: str | tuple[str, ...]
  rank: int
  alpha: float | None = None
  dropout: float = 0.0
  rslora: bool = False
  init: str = "gaussian"
  exclude: str | tuple[str, ...] | None = None
  use_dora: bool = False

  def __post_init__(self):
    pattern, regex = _normalize(self.pattern, "pattern")
    object.__setattr__(self, "pattern", pattern)
    object.__setattr__(self, "_regex", None if regex is None else re.compile(regex))
    if self.exclude is not None:
      exclude, xregex = _normalize(self.exclude, "exclude")
      if xregex is None:
        raise ValueError(f"LoraRule exclude={self.exclude!r}: {ALL_LINEAR!r} cannot be excluded")
      object.__setattr__(self, "exclude", exclude)
      object.__setattr__(self, "_exclude", re.compile(xregex))
    else:
      object.__setattr__(self, "_exclude", None)
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoraRule rank={self.rank!r} must be a positive integer")
    if self.alpha is not None and not (_finite(self.alpha) and self.alpha > 0):
      raise ValueError(
        f"LoraRule alpha={self.alpha!r} must be positive and finite (or None for alpha=rank)"
      )
    if not isinstance(self.use_dora, bool):
      raise ValueError(f"LoraRule use_dora={self.use_dora!r} must be True or False")
    if not (_finite(self.dropout) and 0.0 <= self.dropout < 1.0):
      raise ValueError(f"LoraRule dropout={self.dropout!r} must be in [0, 1)")
    dropout_masks.threshold(self.dropout)  # refuses a rate the masks' 2**-16 steps round to 0 or 1
    if not isinstance(self.init, str) or not (
      (self.init in INITS and self.init != "pissa_niter_K") or _PISSA_NITER.fullmatch(self.init)
    ):
      raise ValueError(
        f"LoraRule init={self.init!r} is not one of {list(INITS)} (K a positive integer: "
        "'pissa_niter_4')"
      )

  @property
  def all_linear(self) -> bool:
    return self.pattern == ALL_LINEAR

  @property
  def effective_alpha(self) -> float:
    return float(self.rank if self.alpha is None else self.alpha)

  @property
  def scale(self) -> float:
    return self.effective_alpha / (self.rank**0.5 if self.rslora else self.rank)

  def matches(self, path: str, linear: bool = True) -> bool:
    """Whether this rule adapts the module at ``path``.

    ``linear`` says whether that module's weight is a linear kernel (used by ``all-linear``).
    """
    if self._exclude is not None and self._exclude.fullmatch(path):
      return False
    if self._regex is None:
      return linear and path.rsplit("/", 1)[-1] not in OUTPUT_HEADS
    return self._regex.fullmatch(path) is not None

  def targets(self) -> tuple[str, ...]:
    """The separately checkable targets: each name of a name list, else the pattern itself."""
    return self.pattern if isinstance(self.pattern, tuple) else (self.pattern,)

  def describe(self) -> str:
    if isinstance(self.pattern, tuple):
      return "[" + ", ".join(repr(n) for n in self.pattern) + "]"
    return repr(self.pattern)


def as_rules(rules) -> tuple[LoraRule, ...]:
  """Accepts one :class:`LoraRule` or a sequence of them."""
  if isinstance(rules, LoraRule):
    return (rules,)
  if isinstance(rules, Sequence) and not isinstance(rules, str) and rules:
    if all(isinstance(r, LoraRule) for r in rules):
      return tuple(rules)
  raise TypeError(
    f"rules must be a LoraRule or a non-empty list of LoraRules, got {rules!r}; "
    'e.g. LoraRule(["query", "value"], rank=8)'
  )


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
