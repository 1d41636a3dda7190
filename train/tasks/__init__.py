"""The tasks a script trains: GLUE classification (:mod:`.glue`) and causal-LM fine-tuning
(:mod:`.clm`), the model setup they share (:mod:`.setup`); and the LoRA write-ups' synthetic seed
experiment (:mod:`.synthetic`, ``train/run_synthetic.py``).
"""
