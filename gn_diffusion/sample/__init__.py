"""Sampling: the model folder (model_folder), generation (generate), the checks before it
(checks), the output folder (output), diffusers pipelines (pipeline) and sample.py's command
(command)."""
