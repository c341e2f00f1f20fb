"""The diffusion process: the noise schedule (schedules), seeded randomness (seeding), a
micro-batch's random draws and augmentations (draws), and the training objective (objective)."""
