"""The training engine, the same for every task: state, step, parallel modes, the loop with its
hooks, a whole run, checkpoints, the run directory and its outputs.

:mod:`train.engine.kinds` is jax-free (the flags read it); the other modules import jax.
"""
