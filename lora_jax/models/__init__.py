"""Flax BERT/RoBERTa encoders that load Hugging Face checkpoints."""
