"""Whole-checkpoint validation on resume: every file of the newest checkpoint is read back before
anything changes; a damaged one sends the resume to the newest complete checkpoint with a warning
naming the file, and a run whose checkpoints are all damaged is refused in one sentence."""

import json
import shutil

import pytest

from gn_diffusion.config import load_config
from gn_diffusion.train.loop import train

from gn_diffusion.cli import run_cli

from conftest import TINY, assert_fails_cleanly, snapshot, tiny_config

FILES = ["model.safetensors", "ema.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json"]
RUN = ["train.checkpoint_every=2", "train.keep_checkpoints=2", "train.sample_every=100"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    train(tiny_config(out, *RUN, "train.max_steps=4"), progress=False)
    return out


def damage(path):
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_in_the_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, capsys, name):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    damage(out / "checkpoints" / "step-4" / name)
    capsys.readouterr()
    train(tiny_config(out, *RUN, "train.max_steps=5", "train.resume=auto"), progress=False)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "step-4" in warning[0] and name in warning[0]
    assert json.loads((out / "checkpoints" / "step-5" / "train_state.json").read_text())["step"] == 5


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_and_left_alone(finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for step in (2, 4):
        damage(out / "checkpoints" / f"step-{step}" / "optimizer.bin")
    before = snapshot(out)
    quiet_train = lambda argv: train(load_config("configs/digits.yaml", argv), progress=False)  # noqa: E731
    with pytest.raises(SystemExit):
        run_cli(quiet_train, [*TINY, f"train.output_dir={out}", *RUN, "train.max_steps=6", "train.resume=auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: every checkpoint in") and len(err) == 3  # two warnings, one error
    assert snapshot(out) == before


def test_a_named_damaged_checkpoint_is_refused(finished, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    damage(out / "checkpoints" / "step-4" / "ema.safetensors")
    damage(out / "checkpoints" / "step-2" / "optimizer.bin")

    quiet_train = lambda argv: train(load_config("configs/digits.yaml", argv), progress=False)  # noqa: E731
    assert_fails_cleanly(capsys, quiet_train, [*TINY, f"train.output_dir={tmp_path / 'new'}", *RUN, "train.max_steps=6",
                                               f"train.resume={out / 'checkpoints' / 'step-4'}"],
                         "is not a complete safetensors file", tmp_path)
    assert_fails_cleanly(capsys, quiet_train, [*TINY, f"train.output_dir={tmp_path / 'new'}", *RUN, "train.max_steps=6",
                                               f"train.resume={out / 'checkpoints' / 'step-2'}"],
                         "is damaged (optimizer.bin", tmp_path)
