"""The non-finite guard: a step whose loss or gradient norm is not finite is skipped on the
device, leaves everything as it was, is counted, and too many in a row stop the run with the
last good checkpoint and the model untouched."""

import copy

import torch

from gn_diffusion.cli import run_cli
from gn_diffusion.config import load_config
from gn_diffusion.train.loop import check_run, start_session, train
from op_count import OpCounter

from conftest import assert_fails_cleanly, script_main, snapshot, tiny_config

BN = ["model.norm=batch", "train.batch_size=4", "train.log_every=100"]


def state_of(session):
    step = session.train_step
    optimizer = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in st.items()}
                 for k, st in step.adamw.state.items()}
    return (copy.deepcopy(step.unwrapped.state_dict()), optimizer, copy.deepcopy(step.ema.state_dict()))


def assert_same(a, b):
    for x, y in zip((a[0], a[2]), (b[0], b[2])):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for key, state in a[1].items():
        for name, value in state.items():
            assert torch.equal(value, b[1][key][name]), name


def test_a_skipped_step_leaves_everything_as_it_was_and_is_counted(tmp_path, monkeypatch):
    session = start_session(check_run(tiny_config(tmp_path / "run", *BN)))
    session.train_step(session.batches, 0)
    before = state_of(session)
    import gn_diffusion.train.step as step_module

    real = step_module.training_loss
    monkeypatch.setattr(step_module, "training_loss", lambda *a: real(*a) * float("nan"))
    with OpCounter() as ops:
        session.train_step(session.batches, 1)
    assert ops.syncs == 0
    assert_same(before, state_of(session))  # weights, BN running statistics, AdamW moments and step, EMA
    assert session.train_step.guard.counts() == (1, 1)
    monkeypatch.setattr(step_module, "training_loss", real)
    session.train_step(session.batches, 2)
    assert session.train_step.guard.counts() == (0, 1)
    after = state_of(session)
    assert not torch.equal(after[0]["conv_in.weight"], before[0]["conv_in.weight"])


def test_too_many_skips_in_a_row_stop_the_run_with_the_good_checkpoints_and_model_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["model.image_size=8", "model.base_channels=16", "model.groups=8", "model.channel_mult=[1]",
            "model.num_res_blocks=1", "model.attention_resolutions=[]", "diffusion.num_train_timesteps=100",
            "train.batch_size=8", "train.warmup_steps=2", "train.sample_num_images=4", "sample.num_images=4",
            "sample.num_inference_steps=3", f"train.output_dir={out}", "train.checkpoint_every=2"]
    run_cli(script_main("train.py"), [*args, "train.max_steps=2", "train.log_every=1"])
    capsys.readouterr()
    model_before = snapshot(out / "model")
    quiet_train = lambda argv: train(load_config("configs/digits.yaml", argv), progress=False)  # noqa: E731
    assert_fails_cleanly(capsys, quiet_train,
                         [*args, "train.max_steps=6", "train.log_every=1", "train.resume=auto", "train.lr=1e30",
                          "train.grad_clip=0", "train.max_bad_steps=1"],
                         "had a non-finite loss or gradient norm (more than train.max_bad_steps=1 in a row); "
                         "the last good checkpoint is", out / "checkpoints")
    assert snapshot(out / "model") == model_before


def scaled_session(tmp_path, scaler):
    """A session stepping through `scaler` as accelerate's fp16 does on a GPU (on the CPU
    accelerate makes none; the step's code path is the same)."""
    checked = check_run(tiny_config(tmp_path / "run", *BN))
    checked.accelerator.scaler = scaler
    return start_session(checked)


def test_under_a_loss_scaler_its_overflow_skips_are_the_guards_skips(tmp_path, monkeypatch):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, backoff_factor=2.0 ** -90)
    session = scaled_session(tmp_path, scaler)
    before = state_of(session)
    import gn_diffusion.train.step as step_module

    real = step_module.training_loss
    # A finite loss whose scaled gradients overflow float32: the scaler's own kind of skip.
    monkeypatch.setattr(step_module, "training_loss", lambda *a: real(*a) * 1e20)
    with OpCounter() as ops:
        session.train_step(session.batches, 0)
    assert ops.syncs == 0
    assert_same(before, state_of(session))  # the BN statistics too, which the scaler alone would not restore
    assert session.train_step.guard.counts() == (1, 1) and scaler.get_scale() == 2.0 ** 10
    monkeypatch.setattr(step_module, "training_loss", real)
    session.train_step(session.batches, 1)
    assert session.train_step.guard.counts() == (0, 1)
    # The output conv starts at zero, so the first good step moves it alone.
    assert not torch.equal(state_of(session)[0]["conv_out.weight"], before[0]["conv_out.weight"])


def test_under_a_loss_scaler_a_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    session = scaled_session(tmp_path, torch.amp.GradScaler("cpu", init_scale=2.0 ** 7))
    session.train_step(session.batches, 0)
    before = state_of(session)
    import gn_diffusion.train.step as step_module

    real = step_module.training_loss
    monkeypatch.setattr(step_module, "training_loss", lambda *a: real(*a) * float("inf"))
    session.train_step(session.batches, 1)
    assert_same(before, state_of(session))
    assert session.train_step.guard.counts() == (1, 1)


class AdamWWithoutFused(torch.optim.AdamW):
    """AdamW as torch builds it on a device without the fused kernel."""

    def __init__(self, params, **options):
        if options.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        super().__init__(params, **options)


def test_a_device_without_fused_adamw_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from conftest import TINY

    monkeypatch.setattr(torch.optim, "AdamW", AdamWWithoutFused)
    out = tmp_path / "out"
    assert_fails_cleanly(capsys, "train.py", [*TINY, f"train.output_dir={out}", "train.max_steps=1"],
                         "has no fused AdamW on cpu, which the non-finite guard needs to skip a bad step on the "
                         "device; set runtime.cpu=true or train on a CUDA device.", tmp_path)
    assert not out.exists()
