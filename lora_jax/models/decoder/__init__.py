"""Llama-family decoders (Llama, Mistral, Qwen2, Qwen3): the model with its KV cache,
generation, and their Hugging Face names."""
