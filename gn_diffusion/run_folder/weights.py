"""Safetensors weights, loaded only after checking that the file is whole, fits the
architecture and holds finite numbers (so a bad file is a clear error, not a traceback or black
images), and found in an exported model folder of either layout (sample/model_folder.py
describes them; export_model writes them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .layout import CHECKPOINT_MODEL_FILE, STATE_FILE, UNET_DIR, WEIGHTS_FILE, model_folder_of, model_weights

_MAX_HEADER = 100 * 2**20


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, after checking the file is complete.

    Reads only the header: a truncated or foreign file fails here, before any tensor is loaded.
    """
    bad = UserError(f"{path} is not a complete safetensors file (truncated or another format); re-export or re-download it.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise bad
        try:
            header = json.loads(f.read(n))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((v["data_offsets"][1] for v in entries.values()), default=0)
            shapes = {k: list(v["shape"]) for k, v in entries.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise bad from None
    if 8 + n + end != size:
        raise bad
    return shapes


def check_weights_fit(model: nn.Module, path: Path) -> None:
    """Raise a UserError unless the file's tensor names and shapes are exactly the model's."""
    have = safetensors_shapes(path)
    want = {k: list(v.shape) for k, v in model.state_dict().items()}
    if have == want:
        return
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if shape:
        detail = f"'{shape[0]}' is {have[shape[0]]} there but {want[shape[0]]} in this config's model"
    else:
        detail = f"{len(missing)} tensor(s) missing and {len(extra)} unexpected, e.g. '{(missing or extra)[0]}'"
    raise UserError(
        f"{path} holds weights of another architecture ({detail}); use the config it was trained with."
    )


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, checked first to be whole, of its architecture and
    finite: the one loader of sampling, evaluation and train.init_from, so a model with a NaN
    weight is refused by name before any folder is touched, not sampled into black images."""
    from safetensors.torch import load_file

    check_weights_fit(model, path)
    tensors = load_file(path, device="cpu")
    check_weights_finite(tensors, path)
    model.load_state_dict(tensors)


def check_weights_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Raise a UserError naming the first tensor of `path` that holds a NaN or an infinity."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        others = f" and {len(bad) - 1} other tensor(s)" if len(bad) > 1 else ""
        raise UserError(f"{path} holds non-finite weights (NaN or infinite values in '{bad[0]}'{others}); the model "
                        "diverged or the file is damaged: use another model or checkpoint, or retrain it.")


def exported_weights(folder: Path) -> Path:
    """model_weights, or a UserError naming what an exported model folder holds."""
    weights = model_weights(folder)
    if weights is None:
        raise UserError(f"{folder} has no model weights ({UNET_DIR}/{WEIGHTS_FILE}, or {WEIGHTS_FILE} in an older "
                        "export); export the model again.")
    return weights


def init_weights_from(model: nn.Module, path: str | Path) -> Path:
    """Load into `model` the weights at `path` (train.init_from): an exported model folder of
    either layout, a run's output folder (its model/), or a training checkpoint folder (its raw,
    not EMA, weights: what the optimizer was training). The file is checked to be whole and of
    this architecture and finite first, and never unpickled. Returns the file read."""
    path = Path(path)
    checkpoint = path / CHECKPOINT_MODEL_FILE
    if checkpoint.is_file() and (path / STATE_FILE).is_file():
        weights = checkpoint
    else:
        exported = model_folder_of(path)
        weights = model_weights(exported) if exported is not None else None
    if weights is None:
        raise UserError(f"train.init_from={path} is not an exported model ({UNET_DIR}/{WEIGHTS_FILE} or "
                        f"{WEIGHTS_FILE}), a run folder holding one, or a training checkpoint "
                        f"({CHECKPOINT_MODEL_FILE} and {STATE_FILE}); point it at one of those.")
    load_weights(model, weights)
    return weights
