"""Data for the tasks: shared file loading (:mod:`.files`), buckets and epoch order
(:mod:`.batching`), packing (:mod:`.packing`); GLUE's (:mod:`.glue`) and causal-LM data
(:mod:`.clm`).
"""
