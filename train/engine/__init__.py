"""The training engine, the same for every task: state, step, parallel modes, the loop with its
hooks, a whole run, checkpoints, the run directory and its outputs.

:mod:`train.engine.kinds` and :mod:`train.engine.errors` are jax-free (the flags and the scripts'
error lines read them); the other modules import jax.
"""
