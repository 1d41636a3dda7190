"""Which modules get an adapter, and with what rank, alpha and dropout.

A :class:`LoraRule` is matched against the ``"a/b/c"`` path of the *module* holding a weight,
measured from the variables dict (``"params/encoder/layer/0/attention/self/query"``). The first
rule that matches a module decides its adapter; a rule that matches nothing is an error. Its
``pattern`` and ``exclude`` are spelled as :class:`lora_jax._src.targets.Targets` (a regex, a
list of PEFT-style module names, or ``"all-linear"``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

from lora_jax._src import dropout as dropout_masks
from lora_jax._src import inits
from lora_jax._src.targets import Targets


def _finite(value) -> bool:
  """A real number (not a bool), neither inf nor NaN."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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
    targets = Targets(self.pattern, self.exclude, owner="LoraRule")
    object.__setattr__(self, "pattern", targets.pattern)
    object.__setattr__(self, "exclude", targets.exclude)
    object.__setattr__(self, "_targets", targets)
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
    try:
      inits.parse(self.init)
    except ValueError as e:
      raise ValueError(f"LoraRule {e}") from None

  @property
  def selector(self) -> Targets:
    """The modules this rule reaches (``pattern`` minus ``exclude``)."""
    return self._targets

  def targets(self) -> tuple[str, ...]:
    """The separately checkable targets: each name of a name list, else the pattern itself."""
    return self._targets.each()

  @property
  def all_linear(self) -> bool:
    return self._targets.all_linear

  @property
  def effective_alpha(self) -> float:
    return float(self.rank if self.alpha is None else self.alpha)

  @property
  def scale(self) -> float:
    return self.effective_alpha / (self.rank**0.5 if self.rslora else self.rank)

  def matches(self, path: str, linear: bool = True) -> bool:
    """Whether this rule adapts the module at ``path`` (see :meth:`Targets.matches`)."""
    return self._targets.matches(path, linear)

  def describe(self) -> str:
    return self._targets.describe()


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
