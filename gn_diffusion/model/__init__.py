"""The model: the U-Net (unet), its normalization layers (norms, with their registry), and
sync_batch_norm. Imports the kernels and the bottom layer only."""
