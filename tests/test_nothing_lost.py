"""Nothing lost, ever: a failing disk, a bad step count, a reused output folder, an image that
cannot be decoded safely and a broken feature extractor each give one `error:` sentence and exit
2 (or, for images, a warning naming the file), and every file that was there stays byte-identical.

Root ignores file modes, so a read-only or full disk is made by the one atomic writer
(files.atomic_path) raising the errno a real one would; one test drops root's override
capabilities with setpriv to meet a real read-only folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image

import gn_diffusion.files as files
import gn_diffusion.sample.generate as generation
import gn_diffusion.sample.command as sample_command
import gn_diffusion.sample.output as sample_output
import gn_diffusion.train.loop as training_loop
from gn_diffusion.ablation import command as ablate
from gn_diffusion.cli import run_cli
from gn_diffusion.data.dataset import build_dataset, image_folder_arrays
from gn_diffusion.evaluate import command as evaluate

from conftest import ROOT, TINY, assert_fails_cleanly, script_main, snapshot, tiny_config

DISK_FAILURES = {errno.EROFS: "is read-only", errno.ENOSPC: "is full", errno.EACCES: "permission denied"}




@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling is the long part: a refusal must come before it. Patched where each command
    finds it: modules that imported it by name at load keep their own reference (and one first
    imported under the patch would keep the refusal for good)."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampled before every check had passed")
    for module in (generation, sample_command, training_loop):
        monkeypatch.setattr(module, "generate", refuse)


def failing_disk(monkeypatch, code):
    """Every atomic write (and the commands' write probe, which goes through it) fails with `code`."""
    @contextlib.contextmanager
    def refuse(path):
        raise OSError(code, os.strerror(code), str(path))
        yield  # noqa: unreachable (a generator, as the real one)
    monkeypatch.setattr(files, "atomic_path", refuse)


def ablation_config(tmp_path, output_dir):
    raw = {"output_dir": str(output_dir),
           "base": {"model": {"image_size": 8, "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                              "attention_resolutions": [], "groups": 4}},
           "grid": {"norms": ["group"], "batch_sizes": [2], "images_seen": 4, "base_batch_size": 2},
           "eval": {"num_images": 4, "kid_subsets": 2}, "loss_triples": 4}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def command(name, run_dir, tmp_path):
    """(main, args) of each command, writing under tmp_path."""
    return {
        "train": ("train.py", [*TINY, f"train.output_dir={tmp_path / 'new'}", "train.max_steps=1"]),
        "sample": ("sample.py", [str(run_dir)]),
        "evaluate": (evaluate.main, [str(run_dir), "eval.num_images=4"]),
        "ablate": (ablate.main, [ablation_config(tmp_path, tmp_path / "sweep")]),
    }[name]


# 1. A failing disk is one sentence naming the path and the fix, in every command.

@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
@pytest.mark.parametrize("name", ["train", "sample", "evaluate", "ablate"])
def test_a_failing_disk_is_one_sentence_in_every_command(run_dir, tmp_path, capsys, monkeypatch, no_sampling, name, code):
    failing_disk(monkeypatch, code)
    main, args = command(name, run_dir, tmp_path)
    assert_fails_cleanly(capsys, main, args, DISK_FAILURES[code], tmp_path)


@pytest.mark.parametrize("name", ["train", "sample", "ablate"])
def test_a_file_where_a_folder_belongs_is_one_sentence(run_dir, tmp_path, capsys, no_sampling, name):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    main, args = {"train": ("train.py", [*TINY, f"train.output_dir={blocker / 'run'}", "train.max_steps=1"]),
                  "sample": ("sample.py", [str(run_dir), f"sample.output_dir={blocker}"]),
                  "ablate": (ablate.main, [ablation_config(tmp_path, blocker / "sweep")])}[name]
    assert_fails_cleanly(capsys, main, args, f"{blocker} is a file where a folder is expected", tmp_path)


def test_the_sentence_comes_from_the_cause_and_a_bug_keeps_its_traceback(tmp_path, capsys):
    def wrapped(argv):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
        except OSError as exc:
            raise RuntimeError("writer failed") from exc
    with pytest.raises(SystemExit):
        run_cli(wrapped, [])
    assert capsys.readouterr().err == f"error: the disk holding {tmp_path / 'x'} is full; free some space there " \
                                      "(or choose a folder on another disk) and run the command again.\n"
    with pytest.raises(FileNotFoundError):  # not the user's disk: a bug, shown as one
        run_cli(lambda argv: open(tmp_path / "missing"), [])


REAL_WRITE = """
import sys
from pathlib import Path
from gn_diffusion.cli import run_cli
from gn_diffusion.files import check_writable, write_text_atomic
target = Path(sys.argv[2])
run_cli(lambda argv: check_writable(target) if sys.argv[1] == "probe" else write_text_atomic(target, "{}"), [])
"""


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs root and setpriv")
@pytest.mark.parametrize("how", ["probe", "atomic write"])
def test_a_really_read_only_folder_is_one_sentence(tmp_path, how):
    """Root without its override capabilities meets a 0555 folder as any user would; the bottom
    modules alone (no torch) keep the subprocess fast."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "kept.json").write_text("mine")
    locked.chmod(0o555)
    before = snapshot(tmp_path)
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    target = locked / ("gen" if how == "probe" else "kept.json")
    done = subprocess.run([*drop, sys.executable, "-c", REAL_WRITE, how.split()[0], str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    named = locked if how == "probe" else target
    assert done.stderr == f"error: permission denied for {named}; give your user access to it or choose another folder.\n"
    assert snapshot(tmp_path) == before


# 2. Evaluate and sample find out that they cannot write before they sample.

@pytest.mark.parametrize("name", ["sample", "evaluate"])
def test_the_output_folder_is_probed_before_sampling(run_dir, tmp_path, capsys, monkeypatch, no_sampling, name):
    failing_disk(monkeypatch, errno.EROFS)
    main, args = command(name, run_dir, tmp_path)
    assert_fails_cleanly(capsys, main, args, f"cannot write to {run_dir}: its file system is read-only", tmp_path)
    monkeypatch.undo()
    files.check_writable(tmp_path / "not" / "yet")  # the real probe: creates nothing, leaves nothing
    assert not (tmp_path / "not").exists() and not list(tmp_path.glob(".write-probe*"))


def test_evaluate_refuses_a_folder_where_its_report_goes_before_sampling(run_dir, capsys, no_sampling):
    (run_dir / "evaluation.json").mkdir()
    assert_fails_cleanly(capsys, evaluate.main, [str(run_dir)], "evaluation.json is a folder where a file is expected",
                         run_dir)


# 3. Sampling is checked before any work, and an output folder never mixes two sets.

@pytest.mark.parametrize("args, message", [
    (["sample.scheduler=dpm-solver++", "sample.num_inference_steps=100"], "dpm-solver++ takes at most 99 steps"),
    (["sample.scheduler=ddim", "sample.num_inference_steps=101"], "ddim takes at most 100 steps"),
    (["sample.scheduler=ddpm", "sample.num_inference_steps=5000"], "set sample.num_inference_steps=100 or fewer"),
    (["sample.guidance_scale=3"], "guidance needs a class-conditional model"),
    (["sample.guidance_scale=.nan"], "'sample.guidance_scale' must be a finite number"),
    (["sample.guidance_scale=inf"], "'sample.guidance_scale' must be a finite number"),
])
def test_sampling_settings_are_checked_before_any_work(run_dir, capsys, no_sampling, args, message):
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), *args], message, run_dir)


def test_a_reused_output_folder_holds_one_whole_set(run_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gen"
    sample = script_main("sample.py")
    run_cli(sample, [str(run_dir), f"sample.output_dir={out}", "sample.num_images=5"])
    run_cli(sample, [str(run_dir), f"sample.output_dir={out}", "sample.num_images=2", "sample.seed=1"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png"]
    assert len(np.load(out / "samples.npz")["images"]) == 2
    capsys.readouterr()

    def full_disk(images, folder):  # the disk fills while the new set is written
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(sample_output, "save_pngs", full_disk)
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), f"sample.output_dir={out}"], f"the disk holding {out} is full",
                         tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "run"]  # no half-written set left beside

    (out / "notes.txt").write_text("mine")
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), f"sample.output_dir={out}"],
                         f"the output folder {out} holds notes.txt besides sample.py's own outputs", tmp_path)
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), f"sample.output_dir={run_dir}"],
                         f"the output folder {run_dir} holds config.yaml and 1 more", tmp_path)


def test_a_swap_interrupted_between_its_renames_gets_the_old_set_back(tmp_path):
    final, new = tmp_path / "gen", tmp_path / "new"
    for folder, text in ((final, "old"), (new, "new")):
        folder.mkdir()
        (folder / "grid.png").write_text(text)
    os.replace(final, tmp_path / ".old-gen")  # a crash after swap_folder's first rename
    files.restore_swapped(final)
    assert (final / "grid.png").read_text() == "old"
    files.swap_folder(new, final)
    assert (final / "grid.png").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["gen"]


# 4. Images that cannot be decoded safely are skipped, by name, before training starts.

def huge_png(path, width, height):
    """A valid PNG header claiming width x height pixels: a decompression bomb's header."""
    Image.new("L", (4, 4)).save(path)
    data = path.read_bytes()
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    path.write_bytes(data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:])


def test_images_that_cannot_be_decoded_safely_are_skipped_by_name(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (16, 16), 60 * i).save(folder / f"good{i}.png")
    Image.new("L", (64, 64), 255).save(folder / "large.png")  # over the limit of 1024 pixels set below
    png = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    huge_png(folder / "bomb.png", 50_000, 50_000)
    cfg = tiny_config(tmp_path / "run", "data.dataset=image_folder", f"data.path={folder}", "data.max_image_pixels=1024")
    with pytest.warns(UserWarning) as caught:
        dataset = build_dataset(cfg)
    said = " ".join(str(w.message) for w in caught)
    assert "skipped 2 unreadable image file(s) of 7" in said and "corrupt.jpg, truncated.png" in said
    assert "larger than data.max_image_pixels=1024: bomb.png (50000x50000), large.png (64x64)" in said
    assert len(dataset) == 3  # fixed here, before training starts
    with pytest.warns(UserWarning) as caught:  # the default limit refuses the bomb too
        assert len(image_folder_arrays(folder, 8, 1, class_labels=False)[0]) == 4
    assert "bomb.png (50000x50000)" in " ".join(str(w.message) for w in caught)
    for name in ("good0.png", "good1.png", "good2.png"):
        (folder / name).unlink()
    assert_fails_cleanly(capsys, "train.py", [*TINY, f"train.output_dir={tmp_path / 'run'}", "data.dataset=image_folder",
                                              f"data.path={folder}", "data.max_image_pixels=1024"],
                         "none of the 4 image files", tmp_path)


# 5. A broken eval.extractor is one sentence, before any sampling.

EXTRACTORS = {
    "missing": ("no_such_module_here:make", "cannot import the feature extractor"),
    "raising": ("broken_features:raising", "failed (RuntimeError: no weights on this disk)"),
    "not_callable": ("broken_features:not_callable", "returned int, not a callable"),
    "bad_features": ("broken_features:bad_features", "broken_features:bad_features failed (RuntimeError"),
    "syntax": ("broken_syntax:make", "failed (SyntaxError"),
}


@pytest.mark.parametrize("case", list(EXTRACTORS))
def test_a_broken_extractor_is_one_sentence(run_dir, tmp_path, capsys, monkeypatch, no_sampling, case):
    (tmp_path / "broken_features.py").write_text(
        "def raising(image_size, in_channels):\n    raise RuntimeError('no weights\\non this disk')\n"
        "def not_callable(image_size, in_channels):\n    return 3\n"
        "def bad_features(image_size, in_channels):\n    return lambda images: object()\n")
    (tmp_path / "broken_syntax.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec, message = EXTRACTORS[case]
    assert_fails_cleanly(capsys, evaluate.main, [str(run_dir), f"eval.extractor={spec}", "eval.num_images=4"],
                         message, tmp_path)
