"""The training scripts' package: ``python -m train.run_glue``, ``python -m train.run_clm``.

* :mod:`train.cli`: flags, ``--config`` YAML files, logging, the scripts' entry point (no jax).
* :mod:`train.engine`: state, step, parallel modes, the loop with its hooks, a whole run,
  checkpoints, the run directory and its outputs; it knows no task.
* :mod:`train.data`: data files, buckets and epoch order, packing; GLUE's and causal-LM data.
* :mod:`train.tasks`: GLUE classification (with its metrics) and causal-LM fine-tuning (with its
  sampler), each with its flags and its run end to end; the model setup they share; the
  synthetic seed experiment (``python -m train.run_synthetic``).
"""
