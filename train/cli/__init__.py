"""Flags, ``--config`` YAML files, logging and the entry point of the training scripts.

Nothing here imports jax at import time: parsing flags (and ``--help``) stays fast.
"""
