"""BERT and RoBERTa encoders (:mod:`.bert`), their heads, and their Hugging Face names."""
