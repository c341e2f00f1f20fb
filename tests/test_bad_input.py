"""Bad input to train.py and sample.py: one sentence on stderr, exit status 2, no traceback,
and every file that was there before is byte-for-byte unchanged."""

import subprocess
import sys

import pytest
import safetensors.torch

from gn_diffusion.run_folder.layout import WEIGHTS_FILE


from conftest import ROOT, TINY, assert_fails_cleanly, random_model, snapshot, tiny_config


def train_args(out, *extra):
    return [*TINY, f"train.output_dir={out}", "train.max_steps=1", *extra]




@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_train_refuses_a_missing_or_empty_data_folder(tmp_path, capsys, folder):
    (tmp_path / "empty").mkdir()
    args = train_args(tmp_path / "out", "data.dataset=image_folder", f"data.path={tmp_path / folder}")
    assert_fails_cleanly(capsys, "train.py", args, "data folder", tmp_path)
    assert not (tmp_path / "out").exists()


def test_train_refuses_an_output_folder_holding_another_run(run_dir, capsys):
    assert_fails_cleanly(capsys, "train.py", train_args(run_dir, "model.base_channels=32"), "holds a different run", run_dir)
    assert_fails_cleanly(capsys, "train.py", train_args(run_dir), "already holds this run; set train.resume=auto", run_dir)
    assert_fails_cleanly(capsys, "train.py", train_args(run_dir, "model.base_channels=32", "train.resume=auto"),
                  "holds a run with other settings", run_dir)


def test_train_refuses_a_checkpoint_of_another_architecture(run_dir, tmp_path, capsys):
    checkpoint = tmp_path / "other" / "step-5"
    checkpoint.mkdir(parents=True)
    other = random_model(tiny_config(tmp_path, "model.base_channels=32")).state_dict()
    for name in ("model.safetensors", "ema.safetensors"):
        safetensors.torch.save_file(other, checkpoint / name)
    (checkpoint / "train_state.json").write_text('{"step": 5, "ema_updates": 5}')
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "new", f"train.resume={checkpoint}"),
                  "holds weights of another architecture", tmp_path)
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "new", f"train.resume={tmp_path / 'nothing'}"),
                  "is not a training checkpoint", tmp_path)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", ["truncated", "not_safetensors", "other_architecture"])
def test_sample_refuses_a_broken_model_file(run_dir, capsys, damage):
    weights = run_dir / "model" / "unet" / WEIGHTS_FILE
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "not_safetensors":
        weights.write_bytes(b"\x80\x04\x95 a pickle, say" + bytes(200))
    else:
        config = run_dir / "model" / "config.yaml"
        config.write_text(config.read_text().replace("base_channels: 16", "base_channels: 32"))
    message = "another architecture" if damage == "other_architecture" else "is not a complete safetensors file"
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir)], message, run_dir)


@pytest.mark.parametrize("args, message", [
    (["sample.scheduler=lms"], "'sample.scheduler' is 'lms'; choose one of ddpm, ddim, dpm-solver++, euler, heun, unipc"),
    (["sample.num_images=0"], "'sample.num_images' must be positive"),
    (["sample.batch_size=-4"], "'sample.batch_size' must be positive"),
    (["sample.num_inference_steps=0"], "'sample.num_inference_steps' must be positive"),
    (["model.base_channels=32"], "sample.py takes only sample.* and runtime.* settings"),
])
def test_sample_refuses_bad_settings(run_dir, capsys, args, message):
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), *args], message, run_dir)


def test_sample_refuses_a_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert_fails_cleanly(capsys, "sample.py", [str(tmp_path / "x")], "holds no exported model", tmp_path)
    assert_fails_cleanly(capsys, "sample.py", [str(tmp_path / "y")], "does not exist", tmp_path)
    assert_fails_cleanly(capsys, "sample.py", [], "needs a run's output folder", tmp_path)


@pytest.mark.parametrize("args, message", [
    (["train.max_steps=0"], "'train.max_steps' must be positive"),
    (["train.batch_size=-1"], "'train.batch_size' must be positive"),
    (["train.resume=auto", "train.overwrite=true"], "set one"),
])
def test_train_refuses_bad_counts(tmp_path, capsys, args, message):
    assert_fails_cleanly(capsys, "train.py", [*TINY, f"train.output_dir={tmp_path / 'out'}", *args], message, tmp_path)


def test_the_real_command_line_exits_2_without_traceback(run_dir):
    before = snapshot(run_dir)
    done = subprocess.run([sys.executable, "train.py", f"train.output_dir={run_dir}", *TINY], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip().startswith("error: ")
    assert "already holds this run" in done.stderr or "different run" in done.stderr
    assert snapshot(run_dir) == before


def test_a_batch_larger_than_the_data_is_refused_before_the_folder_is_made(tmp_path, capsys):
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", "train.batch_size=2000"),
                         "fewer than one batch", tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_built_is_refused_before_the_folder_is_made(tmp_path, capsys):
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", "model.groups=5"),
                         "'model.groups' 5 does not divide", tmp_path)
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", "model.norm=weight"),
                         "'model.norm' is 'weight'", tmp_path)
    assert not (tmp_path / "out").exists()


def test_triton_kernels_where_they_cannot_run_are_refused_before_the_folder_is_made(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", "runtime.backend=triton", "runtime.cpu=true"),
                         "runtime.backend is 'triton' but", tmp_path)
    assert not (tmp_path / "out").exists()
