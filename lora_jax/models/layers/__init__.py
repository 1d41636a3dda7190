"""Layers the model families share: attention (XLA, by query blocks, cuDNN, Pallas), RoPE,
activations and the fused next-token cross-entropy."""
