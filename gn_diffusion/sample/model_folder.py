"""The exported model folder: written whole by export_model, found from a run folder by
model_dir, and loaded (after its weights are checked) by load_model.

An exported model folder is a diffusers pipeline folder, as diffusers' training scripts write it:

    model_index.json      GNDDPMPipeline (unconditional) or GNPipeline (class-conditional)
    unet/                 GNUNet: config.json + diffusion_pytorch_model.safetensors
    scheduler/            the DDPM scheduler's scheduler_config.json
    config.yaml           the run's full config (ours)

Older exports are flat: config.yaml, config.json, scheduler_config.json and the weights at the
top. Both load here; the pipeline layout also loads with DiffusionPipeline.from_pretrained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config, RuntimeConfig, load_saved_config, save_config
from ..errors import UserError
from ..files import atomic_folder, lock_holder, restore_swapped
from ..model.unet import GNUNet, build_unet
from ..run_folder.checkpoint import latest_checkpoint
from ..run_folder.layout import CHECKPOINT_MODEL_FILE, CONFIG_FILE, UNET_DIR, WEIGHTS_FILE, RunLayout, model_folder_of
from ..run_folder.weights import exported_weights, load_weights
from .pipeline import pipeline_for


def model_dir(path: str | Path) -> Path:
    """The model folder of a run's output folder, or `path` itself if it is a model folder. An
    export killed between swap_folder's two renames left no model/ but the previous one, whole,
    at .old-model: it is put back first, as a reused output folder's set is."""
    path = Path(path)
    run = RunLayout(path)
    # A run being trained may be exporting, between the two renames: its folders are left alone.
    if all(lock_holder(RunLayout(folder).lock) is None for folder in (path, path.parent)):
        if not path.exists():
            restore_swapped(path)  # a model folder named directly
        restore_swapped(run.model)
    found = model_folder_of(path)
    if found is not None:
        return found
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a training run's output folder or its model/ folder.")
    raise UserError(f"{path} holds no exported model ({CONFIG_FILE} and {UNET_DIR}/{WEIGHTS_FILE}, or {WEIGHTS_FILE} "
                    "in an older export); pass a finished run's output folder or its model/ folder.")


def load_model(path: str | Path, *, use_ema: bool = True,
               runtime: RuntimeConfig | None = None) -> tuple[GNUNet, Config]:
    """The exported (EMA) model of a run, in eval mode, and the run's Config.

    The run's own runtime settings said how it ran where it trained; the model runs here with
    `runtime` (default: RuntimeConfig()). With `use_ema=False` the raw weights of the run's
    latest checkpoint are loaded instead.
    """
    folder = model_dir(path)
    cfg = dataclasses.replace(load_saved_config(folder / CONFIG_FILE), runtime=runtime or RuntimeConfig())
    model = build_unet(cfg.model, cfg.runtime)
    weights = exported_weights(folder)
    if not use_ema:
        checkpoint = latest_checkpoint(folder.parent)
        if checkpoint is None:
            raise UserError(f"{folder.parent} has no checkpoint with raw weights; set sample.use_ema=true.")
        weights = checkpoint / CHECKPOINT_MODEL_FILE
    load_weights(model, weights)
    return model.eval(), cfg


def export_model(model, cfg: Config, folder: Path) -> Path:
    """The pipeline folder (model_index.json, unet/, scheduler/ with the DDPM scheduler) plus the
    run's config.yaml, written beside `folder` and swapped in whole (files.atomic_folder), so a
    crash or a full disk leaves the previous export as it was."""
    with atomic_folder(folder) as tmp:
        pipeline_for(model, cfg).save_pretrained(tmp, safe_serialization=True)
        save_config(cfg, tmp / CONFIG_FILE)
    return folder
