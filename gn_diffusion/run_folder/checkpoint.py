"""Training checkpoints: `<output_dir>/checkpoints/step-<N>/`, written whole or not at all.

A checkpoint is accelerate's `save_state` (model, optimizer, per-rank RNG states) plus the EMA
weights (`ema.safetensors`) and the step counter (`train_state.json`). It is written under a
temporary name and renamed, so a kill during saving leaves the previous checkpoint the latest.
The EMA and step are stored by us rather than through `register_for_checkpointing`, because
accelerate reads registered objects back with an unrestricted unpickler.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ..errors import UserError
from ..files import swap_folder, writing
from .layout import CHECKPOINT_MODEL_FILE, EMA_FILE, STATE_FILE, RunLayout, checkpoint_step
from .weights import check_weights_fit


def scan_checkpoints(output_dir: str | Path) -> tuple[list[tuple[int, Path]], list[str]]:
    """(step, folder) of the run's checkpoints, oldest first, and a description of every other
    step-<digits> entry. A checkpoint of step n is named as RunLayout.checkpoint names it and its
    train_state.json records step n (or cannot be read: a damaged checkpoint, which resume_point
    passes over); a copy or a renamed folder is none, and is neither resumed from nor deleted.
    Temporary folders of interrupted saves are not looked at."""
    layout = RunLayout(output_dir)
    if not layout.checkpoints.is_dir():
        return [], []
    found, strays = [], []
    for path in layout.checkpoints.iterdir():
        step = checkpoint_step(path)
        if step is None:
            continue
        why = _not_a_checkpoint(path, step, layout)
        if why:
            strays.append(f"{path} ({why})")
        else:
            found.append((step, path))
    return sorted(found), sorted(strays)


def _not_a_checkpoint(path: Path, step: int, layout: RunLayout) -> str | None:
    if path.name != layout.checkpoint(step).name:
        return f"step {step} would be {layout.checkpoint(step).name}"
    if not (path / STATE_FILE).is_file():
        return f"no {STATE_FILE}"
    try:
        recorded = json.loads((path / STATE_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # damaged: find_damage names the file
    return None if recorded == step else f"its {STATE_FILE} records step {recorded}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's checkpoints (see scan_checkpoints), oldest first."""
    return [path for _, path in scan_checkpoints(output_dir)[0]]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def check_checkpoint(path: Path, model) -> None:
    """A UserError unless `path` is a complete checkpoint whose weights fit `model`."""
    missing = [f for f in (STATE_FILE, EMA_FILE, CHECKPOINT_MODEL_FILE) if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise UserError(f"{path} is not a training checkpoint (no {missing[0] if path.is_dir() else 'such folder'}); "
                        "set train.resume to a checkpoints/step-<N> folder or to auto.")
    check_weights_fit(model, path / CHECKPOINT_MODEL_FILE)
    check_weights_fit(model, path / EMA_FILE)


def find_damage(path: Path, model, processes: int) -> str | None:
    """The first file of checkpoint `path` that is missing or cannot be read back whole (with the
    reason), or None when every one can: weights and EMA (finite), optimizer, every process's RNG
    state, the loss scaler where there is one, and train_state.json. Pickled files are read with
    the weights-only loader accelerate uses."""
    import torch
    from safetensors.torch import load_file

    def readable(name: str, read) -> str | None:
        try:
            read(path / name)
            return None
        except Exception as exc:  # any failure to read our own file back means it is damaged
            return f"{name} ({type(exc).__name__})"

    def weights(file: Path) -> None:
        tensors = load_file(file)
        if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
            raise ValueError("non-finite weights")

    def state(file: Path) -> None:
        saved = json.loads(file.read_text())
        int(saved["step"]), int(saved["ema_updates"])

    names = [(CHECKPOINT_MODEL_FILE, weights), (EMA_FILE, weights), ("optimizer.bin", _torch_state),
             *((f"random_states_{rank}.pkl", _torch_state) for rank in range(processes)), (STATE_FILE, state)]
    if (path / "scaler.pt").exists():
        names.append(("scaler.pt", _torch_state))
    for name, read in names:
        damage = readable(name, read)
        if damage:
            return damage
    return None


def _torch_state(file: Path) -> None:
    """Read as accelerate reads it on resume: torch's weights-only loader, with the numpy types
    its RNG states hold allowed."""
    from accelerate.utils import load

    load(file, map_location="cpu")


def resume_point(output_dir: Path, model, processes: int) -> Path | None:
    """The newest complete checkpoint of a run (None if it has none yet): a damaged newer one is
    passed over with a one-line warning naming the damaged file; if every one is damaged, a
    UserError. A checkpoint of another architecture is a UserError, not damage. A step-<digits>
    folder that is no checkpoint (scan_checkpoints) is named in a warning."""
    found, strays = scan_checkpoints(output_dir)
    for stray in strays:
        print(f"warning: {stray} is not a checkpoint of this run; it is neither resumed from nor deleted.",
              file=sys.stderr)
    for _, path in reversed(found):
        damage = find_damage(path, model, processes)
        if damage is None:
            check_checkpoint(path, model)
            return path
        print(f"warning: checkpoint {path} is damaged ({damage}); passing over it.", file=sys.stderr)
    if found:
        raise UserError(f"every checkpoint in {RunLayout(output_dir).checkpoints} is damaged; start over with "
                        "train.overwrite=true or set another train.output_dir.")
    return None


def save_checkpoint(accelerator, output_dir: str | Path, step: int, ema, keep: int,
                    execution: dict | None = None) -> Path:
    """Called on every process (each writes its RNG state); the main one finishes and renames."""
    from safetensors.torch import save_file

    layout = RunLayout(output_dir)
    final, tmp = layout.checkpoint(step), layout.partial_checkpoint(step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    def finish() -> None:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / EMA_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "ema_updates": ema.num_updates,
                                                   "execution": execution}))
        swap_folder(tmp, final)

    # Every process writes into `tmp` (its RNG state): one that fails must not remove it under
    # the others or leave them waiting, so each failure is every process's, and the main process
    # alone removes `tmp`. A full disk, however the writer says it, is an OSError naming `final`.
    fail_together(accelerator, final, tmp, lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    fail_together(accelerator, final, tmp, finish if accelerator.is_main_process else lambda: None)
    if accelerator.is_main_process:
        kept = [path for n, path in scan_checkpoints(output_dir)[0] if n <= step]  # a newer one is never removed
        for old in kept[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def fail_together(accelerator, final: Path, tmp: Path, write) -> None:
    """Run this process's part of writing checkpoint `final` (in `tmp`); if any process's part
    fails, every process raises (its own error, or one naming the process that failed) and the
    main process removes `tmp`."""
    failure = None
    try:
        with writing(tmp, final, remove=False):  # removed below, once every process is done with it
            write()
    except Exception as exc:
        failure = exc
    failed = failure is not None
    if accelerator.num_processes > 1:  # a collective only where there are others to tell
        import torch

        failed = bool(accelerator.reduce(torch.tensor(float(failed), device=accelerator.device), "sum") > 0)
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if failure is not None:
        raise failure
    raise UserError(f"another process could not write checkpoint {final} (its error is in its output); the earlier "
                    "checkpoints are kept: fix that and resume.")


def load_checkpoint(accelerator, path: Path, ema) -> tuple[int, dict | None]:
    """Restore model, optimizer, RNG states and EMA; returns the step to continue from and the
    execution settings the checkpoint was made with (None for older checkpoints)."""
    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text())
    ema.load_state_dict(load_file(path / EMA_FILE, device="cpu"), state["ema_updates"])
    return int(state["step"]), state.get("execution")
