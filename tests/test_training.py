"""Training: the loss, the batches, EMA of parameters and buffers, and a short run end to end."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from gn_diffusion.config import RuntimeConfig, load_config
from gn_diffusion.diffusion.objective import denoising_loss, training_loss
from gn_diffusion.diffusion.schedules import noise_schedule
from gn_diffusion.errors import ConfigError
from gn_diffusion.model.unet import build_unet
from gn_diffusion.sample.generate import generate
from gn_diffusion.sample.model_folder import load_model
from gn_diffusion.train.ema import EMA
from gn_diffusion.train.loop import EpochBatches, train
from gn_diffusion.train.step import learning_rate, to_device

from conftest import tiny_config


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loss_is_zero_for_a_model_that_predicts_the_target(prediction):
    cfg = load_config(None, [f"diffusion.prediction_type={prediction}"]).diffusion
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = noise_schedule(cfg).alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}[prediction]

    seen = []

    class Oracle(nn.Module):
        def forward(self, x, t, class_labels=None):
            seen.append(x)
            return type("Out", (), {"sample": target})

    loss = denoising_loss(Oracle(), x0, t, noise, None, cfg)
    assert torch.allclose(seen[0], a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    assert loss.shape == (4,)
    assert loss.max() < 1e-10
    for other in {"epsilon", "v_prediction", "sample"} - {prediction}:  # the target depends on the type
        wrong = denoising_loss(Oracle(), x0, t, noise, None, dataclasses.replace(cfg, prediction_type=other))
        assert wrong.max() > 0.01


def test_training_loss_draws_only_from_its_generator(tmp_path):
    cfg = tiny_config(tmp_path, "model.num_classes=10", "data.random_flip=true", "train.label_dropout=0.5")
    torch.manual_seed(0)
    model = build_unet(cfg.model)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    batch = {"image": torch.randn(8, 1, 8, 8), "label": torch.arange(8)}
    first = training_loss(model, batch, cfg, torch.Generator().manual_seed(5))
    torch.rand(100)  # moving the global RNG must change nothing
    again = training_loss(model, batch, cfg, torch.Generator().manual_seed(5))
    other = training_loss(model, batch, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_epoch_batches_split_global_batches_across_ranks_and_resume_mid_epoch():
    one = iter(EpochBatches(50, 8, world=1, rank=0, seed=3))
    one_batches = [next(one) for _ in range(12)]  # 6 batches per epoch: crosses an epoch
    assert sorted(sum(one_batches[:6], [])) == sorted(set(sum(one_batches[:6], [])))  # no repeats in an epoch
    assert one_batches[:6] != one_batches[6:12]  # each epoch reshuffles
    ranks = [iter(EpochBatches(50, 4, world=2, rank=r, seed=3)) for r in range(2)]
    for batch in one_batches[:6]:
        assert next(ranks[0]) + next(ranks[1]) == batch
    late = iter(EpochBatches(50, 8, world=1, rank=0, seed=3, start=5))
    assert [next(late) for _ in range(7)] == one_batches[5:12]


def test_learning_rate_warms_up_then_holds(tmp_path):
    cfg = tiny_config(tmp_path, "train.lr=1e-3", "train.warmup_steps=4")
    assert [learning_rate(cfg, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_every_lr_schedule_the_config_accepts_maps_to_a_diffusers_schedule():
    import typing

    from gn_diffusion.config import TrainConfig
    from gn_diffusion.train.step import DIFFUSERS_SCHEDULES

    # get_type_hints, not the field's .type: under postponed annotations that is a string.
    names = typing.get_args(typing.get_type_hints(TrainConfig)["lr_schedule"])
    assert names and set(names) == set(DIFFUSERS_SCHEDULES)


def test_learning_rate_schedules_follow_diffusers_after_the_warm_up(tmp_path):
    for name, tail in (("linear", [0.75, 0.5, 0.25, 0.0]), ("cosine", [0.854, 0.5, 0.146, 0.0])):
        cfg = tiny_config(tmp_path, "train.lr=1.0", "train.warmup_steps=2", "train.max_steps=6", f"train.lr_schedule={name}")
        assert [learning_rate(cfg, s) for s in range(6)] == pytest.approx([0.5, 1.0, *tail], abs=1e-3)


def test_ema_averages_batchnorm_running_statistics():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(model, halflife=1, rampup=0, images_per_update=1)  # decay 0.5
    model.train()
    model(torch.randn(16, 1, 6, 6) * 3 + 2)  # moves running_mean/var and num_batches_tracked
    ema.update(model)
    bn, ema_bn = model[1], ema.model[1]
    assert torch.allclose(ema_bn.running_mean, 0.5 * bn.running_mean)  # averaged with the initial zeros
    assert torch.allclose(ema_bn.running_var, 0.5 * (bn.running_var + 1))
    assert ema_bn.num_batches_tracked.item() == 1  # integer buffers are copied
    weight = model[0].weight.detach().clone()
    assert torch.allclose(ema.model[0].weight, weight)  # unchanged weights stay the average


def test_ema_half_life_is_counted_in_images_and_ramps_up():
    ramped = EMA(nn.Linear(2, 2), halflife=1000, rampup=0.5, images_per_update=10)
    decays = []
    for _ in range(3):
        decays.append(ramped.current_decay())
        ramped.num_updates += 1
    assert decays == pytest.approx([0.0, 0.5 ** (10 / 5), 0.5 ** (10 / 10)])  # half-life: half the images seen
    ramped.num_updates = 10_000
    assert ramped.current_halflife() == 1000  # the ramp ends at the half-life
    # The same half-life at another batch size: an old weight's share halves after 1000 images.
    for per_update in (2, 10, 250):
        ema = EMA(nn.Linear(2, 2), halflife=1000, rampup=0, images_per_update=per_update)
        assert ema.current_decay() ** (1000 / per_update) == pytest.approx(0.5)


def test_class_conditional_run_exports_a_model_that_samples_each_class(tmp_path):
    cfg = tiny_config(tmp_path / "run", "model.num_classes=10", "model.norm=batch", "train.max_steps=3",
                      "train.checkpoint_every=2", "train.sample_every=2", "train.keep_checkpoints=1")
    out = train(cfg, progress=False)
    model_dir = out / "model"
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "scheduler/scheduler_config.json", "config.yaml"):
        assert (model_dir / name).is_file(), name
    assert (out / "samples" / "final.png").is_file() and (out / "samples" / "step-2.png").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]  # keep_checkpoints=1
    assert json.loads((out / "checkpoints" / "step-3" / "train_state.json").read_text())["step"] == 3
    assert list((out / "logs").rglob("events.out.tfevents*"))

    model, run_cfg = load_model(out)
    assert not model.training and run_cfg == dataclasses.replace(cfg, runtime=RuntimeConfig())
    assert not torch.allclose(model.up[0][0].norm1.running_var, torch.ones(1))  # EMA'd BN statistics exported
    sample_cfg = load_config(model_dir / "config.yaml", ["sample.class_labels=[3,7]", "sample.guidance_scale=3"])
    images, labels = generate(model, sample_cfg, progress=False)
    assert images.shape == (4, 1, 8, 8) and labels.tolist() == [3, 7, 3, 7]
    assert images.abs().max() <= 1 and torch.isfinite(images).all()


class Predicts(nn.Module):
    """A stand-in model whose prediction is a fixed tensor."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t, class_labels=None):
        return type("Out", (), {"sample": self.value.expand_as(x)})


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_take_the_form_of_each_prediction_type(tmp_path, prediction):
    cfg = tiny_config(tmp_path, f"diffusion.prediction_type={prediction}", "diffusion.snr_gamma=5").diffusion
    x0, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 50, cfg.num_train_timesteps - 1])
    plain = dataclasses.replace(cfg, snr_gamma=None)
    model = Predicts(torch.zeros(1, 1, 1, 1))
    weighted, unweighted = denoising_loss(model, x0, t, noise, None, cfg), denoising_loss(model, x0, t, noise, None, plain)
    a = noise_schedule(cfg).alphas_cumprod[t].double()
    snr = a / (1 - a)
    expected = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1),
                "sample": snr.clamp(max=5)}[prediction]
    assert torch.isfinite(weighted).all()
    assert torch.allclose(weighted.double(), unweighted.double() * expected, rtol=1e-4)


def test_zero_terminal_snr_needs_v_prediction_and_stays_finite_at_the_last_step(tmp_path):
    with pytest.raises(ConfigError, match="set diffusion.prediction_type=v_prediction"):
        tiny_config(tmp_path, "diffusion.rescale_betas_zero_snr=true")
    cfg = tiny_config(tmp_path, "diffusion.rescale_betas_zero_snr=true", "diffusion.prediction_type=v_prediction",
                      "diffusion.snr_gamma=5")
    assert float(noise_schedule(cfg.diffusion).alphas_cumprod[-1]) == 0.0  # pure noise at t = T - 1
    t = torch.full((2,), cfg.diffusion.num_train_timesteps - 1)
    loss = denoising_loss(Predicts(torch.zeros(1, 1, 1, 1)), torch.randn(2, 1, 8, 8), t, torch.randn(2, 1, 8, 8),
                          None, cfg.diffusion)
    assert torch.isfinite(loss).all()
    from gn_diffusion.diffusion.schedules import make_scheduler

    scheduler = make_scheduler(cfg.diffusion, "ddim")
    scheduler.set_timesteps(5)
    assert int(scheduler.timesteps[0]) == cfg.diffusion.num_train_timesteps - 1  # trailing spacing


def test_offset_noise_adds_a_constant_per_sample_and_channel_drawn_last(tmp_path):
    from gn_diffusion.diffusion.draws import draw_step
    from gn_diffusion.diffusion.seeding import seeded_generator

    images = torch.zeros(4, 3, 8, 8)
    plain = draw_step(images, 100, 0.1, seeded_generator(1))
    offset = draw_step(images, 100, 0.1, seeded_generator(1), offset_noise=0.5)
    assert torch.equal(plain.timesteps, offset.timesteps) and torch.equal(plain.flip, offset.flip)
    shift = offset.noise - plain.noise
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift)) and shift.abs().max() > 0


def test_offset_noise_loss_is_finite_at_the_last_step_and_trains_on_the_offset(tmp_path):
    """The loss with offset noise: its target (epsilon) carries the offset, finite up to t = T - 1."""
    from gn_diffusion.diffusion.draws import draw_step
    from gn_diffusion.diffusion.objective import objective
    from gn_diffusion.diffusion.seeding import seeded_generator

    cfg = tiny_config(tmp_path, "diffusion.offset_noise=0.5")
    images = torch.zeros(2, 1, 8, 8)
    draws = draw_step(images, cfg.diffusion.num_train_timesteps, 0.0, seeded_generator(3), cfg.diffusion.offset_noise)
    draws = dataclasses.replace(draws, timesteps=torch.full((2,), cfg.diffusion.num_train_timesteps - 1))
    zero = Predicts(torch.zeros(1, 1, 1, 1))
    loss = objective(zero, images, torch.zeros(2, dtype=torch.long), draws, cfg)
    assert torch.isfinite(loss) and torch.isclose(loss, draws.noise.square().mean())  # the target is the offset noise


@pytest.mark.parametrize("clip, weight_decay, accumulation", [(0.01, 0.0, 1), (0.01, 0.1, 2), (0.0, 0.1, 1)])
def test_steps_clip_like_clip_grad_norm_then_update_like_adamw(tmp_path, clip, weight_decay, accumulation):
    """Two TrainSteps (clipping inside fused AdamW) equal torch's textbook steps on the same
    batches and draws: the micro-batches' losses over their count, clip_grad_norm_, then
    single-tensor AdamW at the step's learning rate."""
    import copy

    from gn_diffusion.diffusion.seeding import mixed_seed
    from gn_diffusion.train.loop import check_run, start_session

    cfg = tiny_config(tmp_path / "run", f"train.grad_clip={clip}", f"train.weight_decay={weight_decay}",
                      f"train.gradient_accumulation_steps={accumulation}", "runtime.backend=torch")
    session, t = start_session(check_run(cfg)), cfg.train
    step = session.train_step
    reference = copy.deepcopy(step.unwrapped)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1.0, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay, foreach=False)
    for number in range(2):
        batches = [next(session.batches) for _ in range(accumulation)]
        step(iter(batches), number)
        for micro, batch in enumerate(batches, start=number * accumulation):
            generator = torch.Generator().manual_seed(mixed_seed(t.seed, micro, 0))
            on_device = to_device(batch, torch.device("cpu"), torch.contiguous_format)
            (training_loss(reference, on_device, cfg, generator) / accumulation).backward()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip or float("inf"))
        assert (norm > 10 * clip) if clip else norm > 0  # the clip, when set, really cuts
        optimizer.param_groups[0]["lr"] = learning_rate(cfg, number)
        optimizer.step()
        optimizer.zero_grad()
    for (name, ours), theirs in zip(step.unwrapped.named_parameters(), reference.parameters()):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), name
