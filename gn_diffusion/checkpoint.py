"""Training checkpoints: `<output_dir>/checkpoints/step-<N>/`, written whole or not at all.

A checkpoint is accelerate's `save_state` (model, optimizer, per-rank RNG states) plus the EMA
weights (`ema.safetensors`) and the step counter (`train_state.json`). It is written under a
temporary name and renamed, so a kill during saving leaves the previous checkpoint the latest.
The EMA and step are stored by us rather than through `register_for_checkpointing`, because
accelerate reads registered objects back with an unrestricted unpickler.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import UserError
from .model_io import check_weights_fit, replace_dir

_STEP_DIR = re.compile(r"step-(\d+)")
STATE_FILE = "train_state.json"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"  # accelerate's name for the first prepared model


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def check_checkpoint(path: Path, model) -> None:
    """A UserError unless `path` is a complete checkpoint whose weights fit `model`."""
    missing = [f for f in (STATE_FILE, EMA_FILE, MODEL_FILE) if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise UserError(f"{path} is not a training checkpoint (no {missing[0] if path.is_dir() else 'such folder'}); "
                        "set train.resume to a checkpoints/step-<N> folder or to auto.")
    check_weights_fit(model, path / MODEL_FILE)
    check_weights_fit(model, path / EMA_FILE)


def save_checkpoint(accelerator, output_dir: str | Path, step: int, ema, keep: int) -> Path:
    """Called on every process (each writes its RNG state); the main one finishes and renames."""
    from safetensors.torch import save_file

    root = checkpoints_dir(output_dir)
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / EMA_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "ema_updates": ema.num_updates}))
        replace_dir(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema) -> int:
    """Restore model, optimizer, RNG states and EMA; returns the step to continue from."""
    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    ema.load_state_dict(load_file(path / EMA_FILE, device="cpu"), state["ema_updates"])
    return int(state["step"])
