"""The output folder of a training run: refuse to mix two runs, or two processes, in one folder.

A run saves its config as `<output_dir>/config.yaml`. Starting a run where another one lives is
refused unless the user asks to continue it (`train.resume`, with the same model, diffusion and
data settings, on the same images) or to replace it (`train.overwrite=true`, which deletes that
run's own files after naming them, and nothing else in the folder; only a folder whose
config.yaml reads as a run's is replaced). The process writing a run holds an OS lock on
`<output_dir>/.lock` for its whole life; another train.py, sample.py or evaluate meeting it is
refused, naming that process.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from ..config import Config, load_saved_config, save_config
from ..data.sources import DataListing
from ..errors import UserError, file_system_sentence
from ..files import HeldLock, LockTaken, check_name_fits, lock_holder, take_lock, write_text_atomic
from .checkpoint import check_checkpoint, find_damage, resume_point
from .layout import CONFIG_FILE, RunLayout
# Settings a resumed run may change: they do not alter what has been trained so far.
RESUMABLE = ("train.", "sample.", "eval.", "runtime.", "data.num_workers", "model.gradient_checkpointing")


def flat_config(cfg: Config) -> dict[str, Any]:
    """{'section.key': value} of every setting."""
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def config_differences(old: Config, new: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for every setting that differs, except keys starting with `ignore`."""
    a, b = flat_config(old), flat_config(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(ignore)]


def read_run_config(output_dir: Path) -> Config | None:
    path = RunLayout(output_dir).config
    if not path.is_file():
        return None
    try:
        return load_saved_config(path)  # UTF-8, no YAML aliases, as every config is read
    except UserError:
        raise UserError(f"{path} is not a readable run config; move that folder away or set another train.output_dir.") from None


def existing_run_files(output_dir: Path) -> list[Path]:
    return [path for path in RunLayout(output_dir).run_files if path.exists()]


def check_output_path(cfg: Config) -> None:
    """Refuse, before anything runs, an output folder that is a file, holds a file where the run
    keeps a folder, or lies inside the data folder or around it (symlinks resolved)."""
    out = Path(cfg.train.output_dir)
    check_name_fits(RunLayout(out).model)  # the longest name a run writes: its model's swap folder
    if out.exists() and not out.is_dir():
        raise UserError(f"train.output_dir {out} is a file; set train.output_dir to a folder.")
    if out.expanduser().resolve().parent == out.expanduser().resolve():
        raise UserError(f"train.output_dir {out} is the root of the file system; set it to a folder of the run's own, "
                        "e.g. runs/NAME.")
    for path in RunLayout(out).run_folders:
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file where a run keeps its {path.name} folder; move the file away or "
                            "set another train.output_dir.")
    d = cfg.data
    data = Path(d.path).expanduser() if d.dataset != "digits" and d.path else None
    if data is None or not data.exists():  # no folder (digits, a Hub name): nothing to nest
        return
    data, where = data.resolve(), out.expanduser().resolve()
    if where == data or data in where.parents:
        raise UserError(f"train.output_dir {where} is inside data.path {data}, so the run's own images would "
                        "become training data; set train.output_dir outside the data folder.")
    if where in data.parents:
        raise UserError(f"data.path {data} is inside train.output_dir {where}; keep the data out of the run "
                        "folder: set train.output_dir beside it.")


def in_use(run: Path, holder: str, fix: str) -> str:
    """The sentence for a run folder whose lock another process holds."""
    who = f"process {holder}" if holder else "another process"
    return f"{run} is in use by {who}, which holds its lock {RunLayout(run).lock}; {fix}."


def hold_output_dir(out: Path, accelerator) -> HeldLock | None:
    """The run folder's lock, held from before anything reads the folder to the run's end. The
    main process takes it (the others hold none); every process waits for its outcome, so a
    refusal is every process's."""
    lock, refusal, failure = None, None, None
    if accelerator.is_main_process:
        try:
            lock = take_lock(RunLayout(out).lock)
        except LockTaken as taken:
            refusal = in_use(out, taken.holder, "wait for that process to end or set another train.output_dir")
        except Exception as exc:  # the others must not wait for a lock that never comes
            failure = exc
            refusal = file_system_sentence(exc) or f"the main process could not lock {out}; see its traceback."
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if failure is not None:
        raise failure
    if refusal is not None:
        raise UserError(refusal)
    return lock


def refuse_writing_into(path: Path, fix: str) -> None:
    """A UserError when `path` lies in a run folder whose lock a process holds (it is training
    there), so sample.py and evaluate write nothing into a run being written. Creates nothing."""
    path = Path(path).absolute()
    for run in (path, *path.parents):
        holder = lock_holder(RunLayout(run).lock) if RunLayout(run).config.is_file() else None
        if holder is not None:
            raise UserError(in_use(run, holder, fix))


def not_a_run(out: Path, found: list[Path]) -> UserError:
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    return UserError(f"{out} holds {found[0].name}{more} but no {CONFIG_FILE} of a run, so it is not a run of "
                     "this package and nothing in it is replaced; move those files away or set another "
                     "train.output_dir.")


def checked_resume_point(cfg: Config, model, processes: int = 1, listing: DataListing | None = None) -> Path | None:
    """Check (without writing anything, under the folder's lock) that this run may use its output
    folder; returns the checkpoint to resume from, if any."""
    t = cfg.train
    out = Path(t.output_dir)
    old = read_run_config(out)
    found = existing_run_files(out)
    if t.resume is not None:
        if old is not None:
            changed = config_differences(old, cfg, ignore=RESUMABLE)
            if changed:
                raise UserError(f"{out} holds a run with other settings ({changed[0]}); resume it with its own "
                                "config or set another train.output_dir.")
        checkpoint = resume_point(out, model, processes) if t.resume == "auto" else Path(t.resume)
        if checkpoint is not None and t.resume != "auto":
            check_checkpoint(checkpoint, model)
            damage = find_damage(checkpoint, model, processes)
            if damage:
                raise UserError(f"checkpoint {checkpoint} is damaged ({damage}); set train.resume=auto to resume "
                                "from the newest complete one, or name another.")
        elif found and old is None:
            raise not_a_run(out, found)
        if checkpoint is not None and listing is not None:
            check_same_data(out, listing)
        return checkpoint
    if found and old is None:  # not ours: train.overwrite=true would delete someone's files
        raise not_a_run(out, found)
    if found and not t.overwrite:
        changed = config_differences(old, cfg, ignore=("train.overwrite", "train.resume"))
        if changed:
            raise UserError(f"{out} holds a different run ({changed[0]}); set another train.output_dir "
                            "or train.overwrite=true to replace it.")
        raise UserError(f"{out} already holds this run; set train.resume=auto to continue it "
                        "or train.overwrite=true to start over.")
    return None


def recorded_listing(out: Path) -> DataListing | None:
    path = RunLayout(out).data_listing
    if not path.is_file():
        return None  # a run from before listings were recorded
    try:
        return DataListing(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        raise UserError(f"{path} is not a readable record of the run's images; delete it to resume without "
                        "comparing them, or set another train.output_dir.") from None


def check_same_data(out: Path, listing: DataListing) -> None:
    """A resume trains on the images the run started with: refuse one whose images changed."""
    before = recorded_listing(out)
    if before is None or before == listing:
        return
    change = listing.images - before.images
    how = (f"{change} added" if change > 0 else f"{-change} removed" if change < 0
           else "as many, but other names or sizes")
    raise UserError(f"the training images changed since this run started ({before.images} then, {listing.images} "
                    f"now: {how}); a resume must see the same ones: restore the data as it was or start a new run "
                    "in another train.output_dir.")


def claim_output_dir(cfg: Config, listing: DataListing | None = None, fresh: bool = True) -> None:
    """Main process only, after checked_resume_point: remove a replaced run, then save this config and
    (for a run starting at step 0, or one that has none) the record of its images."""
    layout = RunLayout(cfg.train.output_dir)
    if cfg.train.overwrite and cfg.train.resume is None:
        found = existing_run_files(layout.root)
        if found:
            print(f"train.overwrite=true: deleting the previous run's {', '.join(p.name for p in found)} in "
                  f"{layout.root}")
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    save_config(cfg, layout.config)
    if listing is not None and (fresh or not layout.data_listing.is_file()):
        write_text_atomic(layout.data_listing, json.dumps(dataclasses.asdict(listing)))
