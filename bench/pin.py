"""``python -m bench.pin CPUS MODULE ARGS...``: runs ``python -m MODULE ARGS...`` pinned to CPUS.

The affinity is set before the module (and so jax or torch) is imported: both frameworks size
their thread pools from the affinity mask at start-up. ``CPUS`` is a comma list of CPU ids.
"""

import os
import runpy
import sys

if __name__ == "__main__":
  cpus, module, *rest = sys.argv[1:]
  os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
  sys.argv = [module, *rest]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
