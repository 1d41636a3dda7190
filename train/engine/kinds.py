"""The engine's lists of names, in a module without jax so flag parsing can read them.

Each list has this one owner: :mod:`train.engine.state` builds the schedules of
:data:`LR_SCHEDULERS`, :mod:`train.engine.parallel` the modes of :data:`PARALLEL_MODES`, and the
flags (:mod:`train.cli.flags`) offer them as choices.
"""

from __future__ import annotations

PARALLEL_MODES = ("none", "pmap", "mesh")  # train.engine.parallel.Parallel's modes
LR_SCHEDULERS = ("linear", "cosine", "constant")  # train.engine.state.make_schedule's kinds
DTYPES = ("float32", "bfloat16")  # compute dtypes (train.engine.state.compute_dtype)
