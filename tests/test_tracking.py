"""Trackers: tensorboard (with the sample grids as images), wandb offline with no network, none."""

from gn_diffusion.train.loop import train

from conftest import tiny_config

RUN = ["train.max_steps=2", "train.sample_every=1", "train.checkpoint_every=2"]


def test_tensorboard_gets_the_scalars_and_the_sample_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(tiny_config(tmp_path, *RUN), progress=False)
    log = EventAccumulator(str(out / "logs" / "train"), size_guidance={"images": 0}).Reload()
    assert "train/loss" in log.Tags()["scalars"] and "train/skipped_steps" in log.Tags()["scalars"]
    assert [e.step for e in log.Images("samples")] == [1, 2]  # the step-1 grid and the final one


def test_wandb_runs_offline_into_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: not logged in
    out = train(tiny_config(tmp_path / "run", *RUN, "train.log_with=wandb"), progress=False)
    assert list((out / "logs").rglob("offline-run-*")), "an offline wandb run in logs/"


def test_no_tracker_writes_no_logs(tmp_path):
    out = train(tiny_config(tmp_path, *RUN, "train.log_with=none"), progress=False)
    assert not (out / "logs").exists() and (out / "model").is_dir()
