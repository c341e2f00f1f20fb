"""A full disk, anywhere: every write path (checkpoints, the export, grids, config.yaml,
sample.py's set, convert) meets a disk that runs out (a small tmpfs, ENOSPC) or a file-size limit
(RLIMIT_FSIZE, EFBIG) with one `error:` sentence naming the folder, exit 2, no temporary left and
every file that was there byte-identical. Also: names too long for the file system, an export
killed between its two renames, and the modes of what the package writes.

The tmpfs cases mount one (root, as CI runs); the file-size limit needs no root. Everything runs
in this process but one small subprocess, with a tiny run trained once for the module.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gn_diffusion.sample.output as sample_output
from gn_diffusion.config import load_config, save_config
from gn_diffusion.data.convert import main as convert_main
from gn_diffusion.errors import file_system_sentence
from gn_diffusion.images import save_grid
from gn_diffusion.sample.model_folder import export_model
from gn_diffusion.sample.model_folder import load_model
from gn_diffusion.train.loop import train

from conftest import ROOT, TINY, assert_fails_cleanly, launch_two_processes, random_model, snapshot, tiny_config
from test_convert import cifar_archive, small_batches  # noqa: F401 (small_batches: the converter's batch size for those archives)

UMASK = 0o027  # neither the default 022 nor safetensors' private 0600: a mode that follows it shows
NO_LOGS = "train.log_with=none"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-step tiny run (config.yaml, checkpoints/step-1, model/, samples/final.png),
    written under UMASK."""
    out = tmp_path_factory.mktemp("trained") / "run"
    old = os.umask(UMASK)
    try:
        train(tiny_config(out, "train.max_steps=1", NO_LOGS), progress=False)
    finally:
        os.umask(old)
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = shutil.which("mount")
    if mount is None or subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                       capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Take all of the disk's free space but `leave` bytes."""
    stat = os.statvfs(disk)
    with open(disk / "filler", "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, stat.f_bavail * stat.f_frsize - leave)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """RLIMIT_FSIZE for this process: CPython ignores SIGXFSZ, so a write past it fails with EFBIG."""
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def assert_no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob(".*")], "a temporary file or folder was left behind"


def quiet_train(argv: list[str]) -> None:
    """train.py without its progress bar, which would share stderr with the error line."""
    train(load_config(ROOT / "configs" / "digits.yaml", argv), progress=False)


def resume_args(run: Path) -> list[str]:
    """Continue `trained` to step 2 (which rewrites config.yaml: the checkpoints are what must stay)."""
    return [*TINY, f"train.output_dir={run}", "train.max_steps=2", "train.resume=auto", NO_LOGS]


# 1. Checkpoints, the export, grids and config.yaml.

def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(trained, small_disk, capsys):
    run = small_disk / "run"
    shutil.copytree(trained, run)
    fill(small_disk, leave=300_000)  # the weights fit, torch's zip writer meets the end with the optimizer
    assert_fails_cleanly(capsys, quiet_train, resume_args(run), f"the disk holding {run / 'checkpoints' / 'step-2'} is "
                         "full; free some space there", run / "checkpoints")
    assert_no_temporaries(run)


def test_a_checkpoint_over_the_file_size_limit_keeps_the_previous_one(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with file_size_limit(256_000):  # as above: model.safetensors fits, optimizer.bin does not
        assert_fails_cleanly(capsys, quiet_train, resume_args(run), f"writing {run / 'checkpoints' / 'step-2'} went "
                             "over the file-size limit (ulimit -f)", run / "checkpoints")
    assert_no_temporaries(run)


def test_an_export_on_a_full_disk_keeps_the_previous_model(trained, small_disk, capsys):
    run = small_disk / "run"
    shutil.copytree(trained, run)
    fill(small_disk, leave=100_000)  # the configs fit, safetensors meets the end with the weights
    cfg = tiny_config(run)
    model = random_model(cfg)
    assert_fails_cleanly(capsys, lambda argv: export_model(model, cfg, run / "model"), [],
                         f"the disk holding {run / 'model'} is full", run)
    assert_no_temporaries(run)


@pytest.mark.parametrize("what", ["grid", "config.yaml"])
def test_a_grid_or_config_on_a_full_disk_keeps_the_previous_one(trained, small_disk, capsys, what):
    run = small_disk / "run"
    shutil.copytree(trained, run)
    fill(small_disk)
    path, write = {"grid": (run / "samples" / "final.png", lambda p: save_grid(torch.zeros(4, 1, 8, 8), p, upscale=16)),
                   "config.yaml": (run / "config.yaml", lambda p: save_config(tiny_config(run), p))}[what]
    assert_fails_cleanly(capsys, lambda argv: write(path), [], f"the disk holding {path} is full", run)
    assert_no_temporaries(run)


class SafetensorError(Exception):
    """Named as safetensors' own (which its Rust module defines): the mapping goes by the name."""


FULL_TAIL = "; free some space there (or choose a folder on another disk) and run the command again."


@pytest.mark.parametrize("exc, sentence", [
    (OSError(errno.ENOSPC, "No space left on device", "out"), "the disk holding out is full" + FULL_TAIL),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "out"), "your disk quota for out is used up" + FULL_TAIL),
    (SafetensorError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"),
     "your disk quota for the output folder is used up" + FULL_TAIL),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
     "the disk holding the output folder is full" + FULL_TAIL),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"), None),  # a bug: its traceback stays
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
])
def test_only_a_refused_write_becomes_the_disk_sentence(exc, sentence):
    assert file_system_sentence(exc) == sentence


# 2. The commands' own outputs: sample.py's set, convert's folders; and the real process under ulimit -f.

def test_a_sample_set_on_a_full_disk_keeps_the_previous_set(run_dir, small_disk, capsys, monkeypatch):
    out = small_disk / "generated"
    out.mkdir()
    (out / "grid.png").write_bytes(b"the previous set")
    fill(small_disk, leave=8192)  # the write probe passes; the set does not fit
    started = []  # the set's first write, made (or tried) after every check
    monkeypatch.setattr(sample_output, "save_grid", lambda *args, **kwargs: (started.append(1), save_grid(*args, **kwargs)))
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), f"sample.output_dir={out}"],
                         f"the disk holding {out} is full", small_disk)
    assert started, "the disk was full before the set was written: the probe, not the set, refused"
    assert_no_temporaries(small_disk)


def test_convert_on_a_full_disk_leaves_no_half_folder(tmp_path, small_disk, capsys):
    archive, _ = cifar_archive(tmp_path / "cifar-10-binary.tar.gz")
    fill(small_disk)
    out = small_disk / "cifar10"
    assert_fails_cleanly(capsys, convert_main, ["cifar10", str(archive), str(out)],
                         f"the disk holding {out / 'train'} is full", small_disk)
    assert not out.exists() or not list(out.iterdir())


LIMITED_WRITE = """
import sys
from gn_diffusion.cli import run_cli
from gn_diffusion.files import write_text_atomic
run_cli(lambda argv: write_text_atomic(sys.argv[1], "x" * 200_000), [])
"""


def test_a_write_over_ulimit_f_is_one_sentence_not_a_killed_process(tmp_path):
    """The command line under RLIMIT_FSIZE: subprocess resets SIGXFSZ to its default (death) in
    the child, and the interpreter ignores it again, so the write fails with EFBIG."""
    target = tmp_path / "report.json"
    target.write_text("the previous report")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (65_536, resource.RLIM_INFINITY))  # noqa: E731
    done = subprocess.run([sys.executable, "-c", LIMITED_WRITE, str(target)], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: writing {target} went over the file-size limit (ulimit -f) or the largest file "
                           "its file system takes; raise the limit (ulimit -f unlimited) or choose a folder on another "
                           "disk, and run the command again.\n")
    assert target.read_text() == "the previous report" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


# 3. Names too long, an interrupted model swap, and modes.

@pytest.mark.parametrize("command", ["train", "sample"])
def test_a_name_too_long_for_the_file_system_is_one_sentence(run_dir, tmp_path, capsys, command):
    long = tmp_path / ("n" * 300)
    main, args = {"train": ("train.py", [*TINY, f"train.output_dir={long / 'run'}", "train.max_steps=1", NO_LOGS]),
                  "sample": ("sample.py", [str(run_dir), f"sample.output_dir={long / 'generated'}"])}[command]
    assert_fails_cleanly(capsys, main, args, "holds a name of 300 bytes, over the 255 most file systems allow; "
                         "choose a shorter name.", tmp_path)


@pytest.mark.parametrize("named", ["run folder", "model folder"])
def test_a_model_swap_killed_between_its_renames_loads_the_previous_model(run_dir, named):
    """The state a SIGKILL between swap_folder's renames leaves: no model/, the previous model at
    .old-model and the new one, complete, at its temporary name."""
    model = run_dir / "model"
    before = snapshot(model)
    shutil.copytree(model, run_dir / f".tmp-model-{os.getpid()}")
    os.replace(model, run_dir / ".old-model")
    loaded, _ = load_model(run_dir if named == "run folder" else model)
    assert snapshot(model) == before and not (run_dir / ".old-model").exists()
    assert loaded.config.sample_size == 8


def test_an_export_removes_what_a_killed_export_left_and_nothing_of_a_live_one(run_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid in (int(dead.stdout), os.getppid()):  # a process gone, and one still running
        shutil.copytree(run_dir / "model", run_dir / f".tmp-model-{pid}")
    cfg = tiny_config(run_dir)
    export_model(random_model(cfg), cfg, run_dir / "model")
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".tmp")) == [f".tmp-model-{os.getppid()}"]


def test_every_file_written_follows_the_umask(trained):
    """Checkpoint (accelerate's and the EMA's safetensors), export, grid and config.yaml alike."""
    found = {str(p.relative_to(trained)): p.stat().st_mode & 0o777 for p in trained.rglob("*") if p.is_file()}
    assert "checkpoints/step-1/ema.safetensors" in found and "model/unet/diffusion_pytorch_model.safetensors" in found
    assert found == dict.fromkeys(found, 0o666 & ~UMASK)


def _one_process_full_at_a_checkpoint(out: str):
    """Both ranks save a checkpoint; rank 1's disk refuses its RNG state. Each rank records what
    it raised (instead of hanging in a barrier, or losing the folder under the other)."""
    import accelerate.checkpointing
    from accelerate import Accelerator

    from gn_diffusion.run_folder.checkpoint import save_checkpoint
    from gn_diffusion.train.ema import EMA

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    if accelerator.process_index == 1:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(out) / "checkpoints" / ".tmp-step-3"))
        accelerate.checkpointing.save = full  # what writes random_states_1.pkl
    try:
        save_checkpoint(accelerator, out, 3, EMA(accelerator.unwrap_model(model), 100, 0, 10), keep=2)
        said = "saved"
    except Exception as exc:
        said = file_system_sentence(exc) or str(exc)
    (Path(out) / f"rank-{accelerator.process_index}.txt").write_text(said)


def test_a_full_disk_on_one_process_at_a_checkpoint_stops_every_process(tmp_path):
    launch_two_processes(_one_process_full_at_a_checkpoint, str(tmp_path))
    assert (tmp_path / "rank-1.txt").read_text().startswith(f"the disk holding {tmp_path / 'checkpoints' / 'step-3'}")
    assert "another process could not write checkpoint" in (tmp_path / "rank-0.txt").read_text()
    assert not (tmp_path / "checkpoints" / ".tmp-step-3").exists() and not (tmp_path / "checkpoints" / "step-3").exists()
