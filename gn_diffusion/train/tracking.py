"""Experiment trackers through accelerate: tensorboard (default), wandb, or none.

wandb runs offline unless the machine is logged in (WANDB_API_KEY, or wandb's entry in
~/.netrc), so a run never waits on a network it does not have; its files go to the run's logs/.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config
from ..errors import ConfigError
from ..run_folder.layout import RunLayout


def log_with(cfg: Config) -> Optional[str]:
    """accelerate's log_with for train.log_with."""
    return None if cfg.train.log_with == "none" else cfg.train.log_with


def check_tracker(cfg: Config) -> None:
    """A ConfigError when the chosen tracker is not installed (before anything is written)."""
    if cfg.train.log_with == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.log_with=wandb but wandb is not installed; pip install 'gn-diffusion[wandb]' "
                          "or set train.log_with=tensorboard.")


def start_trackers(accelerator, cfg: Config, settings: dict[str, Any]) -> None:
    if cfg.train.log_with == "none":
        return
    options = {}
    if cfg.train.log_with == "wandb":
        if not _wandb_logged_in():
            os.environ.setdefault("WANDB_MODE", "offline")
        logs = RunLayout(cfg.train.output_dir).logs
        logs.mkdir(parents=True, exist_ok=True)
        options = {"wandb": {"dir": str(logs)}}
    accelerator.init_trackers("train", config=settings, init_kwargs=options)


def log_grid(accelerator, grid: Path, step: int) -> None:
    """A sample grid (PNG) as an image in every tracker."""
    from PIL import Image

    with Image.open(grid) as img:
        array = np.asarray(img.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": array[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [array]}, step=step)


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
