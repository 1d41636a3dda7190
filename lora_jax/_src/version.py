"""The lora_jax release (recorded in saved adapters)."""

__version__ = "0.1.0"
