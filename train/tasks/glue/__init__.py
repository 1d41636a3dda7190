"""GLUE classification: flags (:mod:`.args`), task (:mod:`.task`), metrics (:mod:`.metrics`) and
the run end to end (:mod:`.pipeline`).
"""
