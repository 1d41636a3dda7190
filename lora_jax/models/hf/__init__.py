"""Hugging Face I/O: checkpoint folders, name conversion, the family registry,
``from_pretrained`` / ``from_config`` and the merged export."""
