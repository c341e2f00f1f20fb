"""Runs that collide or own the wrong files: a second process on a run folder, an overwrite of a
folder that is no run, a run folder inside its data, data that changed between sessions, folders
that only look like checkpoints, and files where a run keeps its folders. Each is refused in one
sentence before the folder is touched, or (for stray checkpoints) named and left alone."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

import gn_diffusion.sample.generate as generation
from gn_diffusion.config import save_config
from gn_diffusion.data.dataset import build_dataset
from gn_diffusion.errors import UserError
from gn_diffusion.evaluate import command as evaluate
from gn_diffusion.run_folder.checkpoint import list_checkpoints
from gn_diffusion.run_folder.claim import claim_output_dir
from gn_diffusion.run_folder.layout import RunLayout
from gn_diffusion.train.loop import check_run, train

from conftest import ROOT, TINY, assert_fails_cleanly, snapshot, tiny_config

HOLD = "import sys; from gn_diffusion.files import take_lock; lock = take_lock(sys.argv[1]); print('held', flush=True); sys.stdin.read()"


@contextlib.contextmanager
def lock_held_elsewhere(run):
    """Another process holding `run`'s lock as train.py does (the bottom module alone: no torch),
    killed when the block ends."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(RunLayout(run).lock)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=60)


def train_args(out, *extra):
    return [*TINY, f"train.output_dir={out}", "train.max_steps=1", *extra]


# 1. One process writes a run folder at a time.

def test_a_locked_run_folder_is_refused_naming_the_holder_until_it_dies(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("sampled into a locked run"))
    with lock_held_elsewhere(run_dir) as holder:
        said = f"{run_dir} is in use by process {holder.pid}, which holds its lock {run_dir / '.lock'}; "
        assert_fails_cleanly(capsys, "train.py", train_args(run_dir, "train.resume=auto"),
                             said + "wait for that process to end or set another train.output_dir.", run_dir)
        assert_fails_cleanly(capsys, "sample.py", [str(run_dir)], said + "wait for it to end", run_dir)
        assert_fails_cleanly(capsys, evaluate.main, [str(run_dir)], said + "wait for it to end, then evaluate", run_dir)
    killed = snapshot(run_dir)  # its .lock is left behind, its pid inside
    with pytest.raises(UserError, match="holds a run with other settings"):  # refused after taking the lock
        check_run(tiny_config(run_dir, "model.base_channels=32", "train.resume=auto"))
    assert snapshot(run_dir) == killed
    checked = check_run(tiny_config(run_dir, "train.max_steps=1", "train.resume=auto"))  # a killed holder holds nothing
    assert (run_dir / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(UserError, match=f"is in use by process {os.getpid()},"):
        check_run(tiny_config(run_dir, "train.max_steps=1", "train.resume=auto"))
    checked.release()
    assert not (run_dir / ".lock").exists()


# 2. train.overwrite=true replaces a run of this package's, and nothing else.

def test_overwrite_deletes_only_a_folder_whose_config_reads_as_a_run(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "my_weights.bin").write_bytes(b"weights")
    (out / "logs").mkdir()
    (out / "logs" / "notes.txt").write_text("notes")
    for extra in ([], ["train.overwrite=true"], ["train.resume=auto"]):
        assert_fails_cleanly(capsys, "train.py", train_args(out, *extra),
                             f"{out} holds model and 1 more but no config.yaml of a run, so it is not a run", tmp_path)
    cfg = tiny_config(out, "train.max_steps=1", "train.overwrite=true")
    save_config(tiny_config(out, "model.base_channels=32"), out / "config.yaml")  # now it is a run: replaced
    checked = check_run(cfg)
    claim_output_dir(cfg, checked.listing)
    checked.release()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "data.json"]


# 3. A run folder and its data folder stay apart; a resume trains on the images it started with.

def image_folder(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("L", (8, 8), 20 * i).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("case", ["inside", "around", "inside through a symlink"])
def test_an_output_folder_inside_the_data_folder_or_around_it_is_refused(tmp_path, capsys, case):
    data = image_folder(tmp_path / "images", 1).resolve()
    (tmp_path / "link").symlink_to(data)
    out, data_path = {"inside": (data / "run", data), "around": (tmp_path, data),
                      "inside through a symlink": (tmp_path / "link" / "run", tmp_path / "link")}[case]
    message = f"data.path {data} is inside train.output_dir" if case == "around" else \
        f"train.output_dir {data / 'run'} is inside data.path {data}, so the run's own images would become training data"
    assert_fails_cleanly(capsys, "train.py", train_args(out, "data.dataset=image_folder", f"data.path={data_path}"),
                         message, tmp_path)
    assert not (data / "run").exists()


def test_a_resume_on_other_images_is_refused_naming_how_many_changed(tmp_path, capsys):
    data, out = image_folder(tmp_path / "images", 8), tmp_path / "run"
    args = train_args(out, "data.dataset=image_folder", f"data.path={data}", "train.batch_size=4", "train.sample_every=100")
    train(tiny_config(out, *args), progress=False)
    assert json.loads((out / "data.json").read_text())["images"] == 8
    resume = [*args, "train.max_steps=2", "train.resume=auto"]
    for change, said in ((lambda: image_folder(data, 9), "(8 then, 9 now: 1 added)"),
                         (lambda: [(data / f"{i}.png").unlink() for i in (8, 7, 6)], "(8 then, 6 now: 2 removed)"),
                         (lambda: Image.effect_noise((8, 8), 64).save(image_folder(data, 8) / "0.png"),
                          "(8 then, 8 now: as many, but other names or sizes)")):
        change()
        assert_fails_cleanly(capsys, "train.py", resume, f"the training images changed since this run started {said}; "
                             "a resume must see the same ones", out)
    image_folder(data, 8)  # as it was: the resume may go on
    check_run(tiny_config(out, *resume)).release()


def test_an_hf_split_is_listed_by_its_files_and_rows(tmp_path):
    from test_data_sources import save_hf

    cfg = tiny_config(tmp_path / "run", "data.dataset=hf", f"data.path={tmp_path / 'hf'}", "model.in_channels=3")

    def listing(**rows):
        shutil.rmtree(tmp_path / "hf", ignore_errors=True)
        save_hf(tmp_path / "hf", **rows)
        return build_dataset(cfg).listing()

    first = listing()
    assert listing() == first  # the same split saved again
    assert listing(train_rows=25).images == 25
    with pytest.warns(UserWarning, match="skipped 1 row"):
        same_count = listing(train_rows=25, blank=(3,))  # 24 rows with an image, as at first, but not the same rows
    assert same_count.images == first.images and same_count != first


# 4. Only step-<n> folders recording step n are checkpoints; rotation removes only older ones.

@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "run"
    train(tiny_config(out, "train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                      "train.sample_every=100"), progress=False)
    return out


def copy_run(source, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out, out / "checkpoints"


def test_folders_that_only_look_like_checkpoints_are_named_and_never_used_or_deleted(three_checkpoints, tmp_path, capsys):
    out, checkpoints = copy_run(three_checkpoints, tmp_path)
    shutil.copytree(checkpoints / "step-1", checkpoints / "step-0099")  # a copy under a name train.py never writes
    shutil.copytree(checkpoints / "step-1", checkpoints / "step-7")  # records step 1
    (checkpoints / "step-8").mkdir()
    assert [p.name for p in list_checkpoints(out)] == ["step-1", "step-2", "step-3"]
    capsys.readouterr()
    train(tiny_config(out, "train.max_steps=4", "train.keep_checkpoints=1", "train.resume=auto"), progress=False)
    said = capsys.readouterr()
    warnings = [line for line in said.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {checkpoints / name} ({why}) is not a checkpoint of this run; it is neither resumed "
                        "from nor deleted." for name, why in (("step-0099", "step 99 would be step-99"),
                                                              ("step-7", "its train_state.json records step 1"),
                                                              ("step-8", "no train_state.json"))]
    assert f"resuming from {checkpoints / 'step-3'}" in said.out
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0099", "step-4", "step-7", "step-8"]


def test_rotation_never_deletes_a_checkpoint_newer_than_the_one_written(three_checkpoints, tmp_path):
    out, checkpoints = copy_run(three_checkpoints, tmp_path)
    train(tiny_config(out, "train.max_steps=2", "train.keep_checkpoints=1", f"train.resume={checkpoints / 'step-1'}"),
          progress=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-3"]


# 5. A file where a run keeps a folder is refused before config.yaml is rewritten.

@pytest.mark.parametrize("name", ["checkpoints", "model", "samples", "logs"])
def test_a_file_where_a_run_keeps_a_folder_is_refused(run_dir, capsys, name):
    shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / name).write_text("mine")
    before = snapshot(run_dir)
    assert_fails_cleanly(capsys, "train.py", train_args(run_dir, "train.resume=auto"),
                         f"{run_dir / name} is a file where a run keeps its {name} folder", run_dir)
    assert snapshot(run_dir) == before
