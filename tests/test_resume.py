"""Exact resume: stopping at step k and resuming to n gives the same weights, EMA and optimizer
state as an uninterrupted run, with one and with two processes; a kill during a checkpoint save
leaves the previous checkpoint in charge."""

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate.state import PartialState

from gn_diffusion.errors import UserError
from gn_diffusion.files import take_lock
from gn_diffusion.run_folder.checkpoint import latest_checkpoint
from gn_diffusion.train.loop import check_run, train
from conftest import in_each_process, launch_two_processes, tiny_config

# Dropout, flips, label dropout and accumulation all draw randomness that must resume exactly.
STRESS = ["model.dropout=0.1", "data.random_flip=true", "model.num_classes=10", "train.gradient_accumulation_steps=2",
          "train.batch_size=4", "train.checkpoint_every=2", "train.sample_every=100", "train.keep_checkpoints=3",
          "train.lr_schedule=cosine"]


def run(out, *overrides, progress=False):
    return train(tiny_config(out, *STRESS, *overrides), progress=progress)


def checkpoint_state(out, step):
    folder = out / "checkpoints" / f"step-{step}"
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    return {
        "model": safetensors.torch.load_file(folder / "model.safetensors"),
        "ema": safetensors.torch.load_file(folder / "ema.safetensors"),
        "optimizer": optimizer["state"],
        "train_state": json.loads((folder / "train_state.json").read_text()),
    }


def assert_identical(a, b):
    assert a["train_state"] == b["train_state"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part} {name}"
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for index, state in a["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"][index][key]), f"optimizer {index} {key}"


# Two processes: BatchNorm synchronised across them (gloo), the norm with the most cross-process state.
SYNCED = "model.norm=sync_batch"


def _stop_then_resume_on_two_processes(tmp: str):
    in_each_process(tmp)
    tmp = Path(tmp)
    run(tmp / "full", SYNCED, "train.max_steps=4")
    run(tmp / "split", SYNCED, "train.max_steps=2")
    run(tmp / "split", SYNCED, "train.max_steps=4", "train.resume=auto")
    # The main process alone holds the folder's lock, and its refusal is every process's.
    state = PartialState()
    held = take_lock(tmp / "split" / ".lock") if state.is_main_process else None
    state.wait_for_everyone()
    holder = (tmp / "split" / ".lock").read_text().strip()
    with pytest.raises(UserError, match=f"is in use by process {holder}, "):
        check_run(tiny_config(tmp / "split", *STRESS, SYNCED, "train.max_steps=6", "train.resume=auto"))
    if held is not None:
        held.release()


def test_resume_is_exact_with_two_processes_and_synchronised_batch_norm(tmp_path):
    launch_two_processes(_stop_then_resume_on_two_processes, str(tmp_path))
    assert (tmp_path / "rank-0-ran").exists() and (tmp_path / "rank-1-ran").exists()
    assert (tmp_path / "full" / "checkpoints" / "step-4" / "random_states_1.pkl").is_file()  # rank 1 saved its RNG
    full = checkpoint_state(tmp_path / "full", 4)
    assert_identical(full, checkpoint_state(tmp_path / "split", 4))
    assert int(full["model"]["norm_out.num_batches_tracked"]) == 8  # 4 steps x 2 accumulation micro-batches
    assert not torch.equal(full["model"]["norm_out.running_var"], torch.ones_like(full["model"]["norm_out.running_var"]))
    assert "norm: sync_batch" in (tmp_path / "full" / "config.yaml").read_text()


def test_resume_is_exact_with_one_process_even_after_a_kill_during_saving(tmp_path, monkeypatch):
    run(tmp_path / "full", "train.max_steps=4")
    run(tmp_path / "split", "train.max_steps=2")  # stops at step 2 (and exports)
    real_save = safetensors.torch.save_file

    def killed(tensors, filename, *args, **kwargs):  # dies half-way through writing step 4's EMA
        if ".tmp-step-4" in str(filename):
            Path(filename).write_bytes(b"\x00" * 100)
            raise KeyboardInterrupt
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "split", "train.max_steps=4", "train.resume=auto")
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "split").name == "step-2"
    assert (tmp_path / "split" / "checkpoints" / ".tmp-step-4" / "model.safetensors").is_file()

    run(tmp_path / "split", "train.max_steps=4", "train.resume=auto")
    assert sorted(os.listdir(tmp_path / "split" / "checkpoints")) == ["step-2", "step-4"]
    full, split = checkpoint_state(tmp_path / "full", 4), checkpoint_state(tmp_path / "split", 4)
    assert_identical(full, split)
    assert not torch.equal(full["model"]["conv_out.weight"], checkpoint_state(tmp_path / "full", 2)["model"]["conv_out.weight"])
