"""The paths of a run folder and the names of our files in it, in one place. Inside a
checkpoint, accelerate names its own files (optimizer.bin, random_states_<rank>.pkl).

    <output_dir>/config.yaml                 the run's full config
    <output_dir>/data.json                   the training images' count and digest, for resume
    <output_dir>/.lock                       held by the process writing the run (its pid inside)
    <output_dir>/checkpoints/step-N/         accelerate state + ema.safetensors + train_state.json
    <output_dir>/model/                      the exported EMA model: a diffusers pipeline folder
    <output_dir>/samples/step-N.png, final.png
    <output_dir>/logs/                       tensorboard scalars
    <output_dir>/generated/                  sample.py's default output
    <output_dir>/evaluation.json             the evaluate command's report
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"
LOCK_FILE = ".lock"
# In a checkpoint folder: accelerate's name for the first prepared model, our EMA and step files.
CHECKPOINT_MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"
# An exported model folder is a diffusers pipeline folder: model_index.json, unet/ (what
# ModelMixin.save_pretrained writes) and scheduler/, plus the run's config.yaml. Older exports
# held the unet's files at the top.
MODEL_INDEX = "model_index.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def data_listing(self) -> Path:
        return self.root / DATA_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def generated(self) -> Path:
        return self.root / "generated"

    @property
    def evaluation(self) -> Path:
        return self.root / "evaluation.json"

    @property
    def run_folders(self) -> tuple[Path, ...]:
        """The folders a training run writes into."""
        return (self.checkpoints, self.model, self.samples, self.logs)

    @property
    def run_files(self) -> tuple[Path, ...]:
        """What a training run writes: what train.overwrite=true deletes, and nothing else."""
        return (self.config, self.data_listing, *self.run_folders)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def partial_checkpoint(self, step: int) -> Path:
        """Where a checkpoint is written before it is renamed into place."""
        return self.checkpoints / f".tmp-step-{step}"

    def grid(self, step: int | None = None) -> Path:
        """The training grid at `step`, or the final one."""
        return self.samples / ("final.png" if step is None else f"step-{step}.png")  # named as checkpoints are


def checkpoint_step(path: Path) -> int | None:
    """N of a checkpoints/step-N folder, or None for any other name (step-0099 gives 99: a name
    that RunLayout.checkpoint does not write, which checkpoint.scan_checkpoints sets apart)."""
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def model_weights(folder: Path) -> Path | None:
    """The U-Net weights file of an exported model folder (pipeline layout, then the older flat
    one), or None when there is neither."""
    for weights in (folder / UNET_DIR / WEIGHTS_FILE, folder / WEIGHTS_FILE):
        if weights.is_file():
            return weights
    return None


def model_folder_of(path: Path) -> Path | None:
    """The exported model folder that `path` names, a run's output folder (its model/) or a model
    folder itself, for sampling, evaluation and train.init_from alike; None where it names
    neither. A run's own config.yaml sits beside no weights, which tells the two apart."""
    exported = RunLayout(path).model
    if (exported / CONFIG_FILE).is_file():
        return exported
    if (path / CONFIG_FILE).is_file() and model_weights(path) is not None:
        return path
    return None
