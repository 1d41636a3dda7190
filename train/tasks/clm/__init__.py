"""Causal-LM fine-tuning: flags (:mod:`.args`), task (:mod:`.task`), sampler (:mod:`.sampler`) and
the run end to end (:mod:`.pipeline`).
"""
