"""The run folder: its paths (layout), claiming and locking it (claim), checkpoints
(checkpoint), and checked safetensors weights (weights)."""
