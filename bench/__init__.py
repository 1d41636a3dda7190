"""Training-step benchmarks for lora_jax (see ``bench/train_step.py`` and ``docs/benchmarks.md``).

The modules here import neither jax nor torch at import time, except the two workers
(:mod:`bench.jax_step`, :mod:`bench.peft_step`), which run one configuration each in a fresh
process so that per-configuration peak memory is meaningful.
"""
