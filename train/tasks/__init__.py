"""The tasks a script trains: GLUE classification (:mod:`.glue`) and causal-LM fine-tuning
(:mod:`.clm`), and the model setup they share (:mod:`.setup`).
"""
