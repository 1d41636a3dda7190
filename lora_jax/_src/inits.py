"""How an adapter starts: the ``init`` kinds, parsed in one place.

``"gaussian"`` and ``"kaiming_uniform"`` draw ``A`` and leave the weight alone; ``"pissa"``,
``"pissa_niter_K"`` (a randomized SVD with ``K`` subspace iterations) and ``"olora"`` take
``A`` and ``B`` from the weight and replace it by the residual (:mod:`lora_jax._src.svd_init`).
Adapters keep the spelling (``LoraSpec.init``, saved adapters); :func:`parse` reads it.

Example:
  >>> parse("pissa_niter_4")
  InitKind(name='pissa', niter=4)
  >>> parse("olora").rewrites_base, parse("gaussian").rewrites_base
  (True, False)
"""

from __future__ import annotations

import dataclasses
import re

# The spellings, as LoraRule(init=...) and PEFT's init_lora_weights take them ("pissa_niter_K":
# K a positive integer).
INITS = ("gaussian", "kaiming_uniform", "pissa", "pissa_niter_K", "olora")
_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


@dataclasses.dataclass(frozen=True)
class InitKind:
  """A parsed ``init``: its ``name`` and, for ``"pissa_niter_K"``, ``niter=K``."""

  name: str
  niter: int | None = None

  @property
  def rewrites_base(self) -> bool:
    """Whether the adapter starts from the weight, which becomes the residual (PiSSA, OLoRA)."""
    return self.name in ("pissa", "olora")

  def __str__(self) -> str:
    return f"pissa_niter_{self.niter}" if self.niter is not None else self.name


def parse(init) -> InitKind:
  """The :class:`InitKind` of a spelling.

  Raises:
    ValueError: not one of :data:`INITS` (``K`` a positive integer).
  """
  if isinstance(init, str):
    m = _NITER.fullmatch(init)
    if m:
      return InitKind("pissa", int(m.group(1)))
    if init in INITS and init != "pissa_niter_K":
      return InitKind(init)
  raise ValueError(
    f"init={init!r} is not one of {list(INITS)} (K a positive integer: 'pissa_niter_4')"
  )
