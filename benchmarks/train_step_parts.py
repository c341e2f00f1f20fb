"""The pieces `bench_train_step.py` times: the contenders (our TrainStep; diffusers' UNet2DModel
with a hand-written step equal to ours, and trained as diffusers' own example trains it; the
whole loop and the bare step) and the per-step measurements (wall clock, host CPU time, memory,
dispatched ops or launches)."""

from __future__ import annotations

import copy
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
import torch
import torch.nn.functional as F

from gn_diffusion.config import Config, load_config
from gn_diffusion.diffusion.draws import draw_step
from gn_diffusion.diffusion.objective import objective
from gn_diffusion.diffusion.schedules import make_scheduler
from gn_diffusion.diffusion.seeding import seeded_generator
from gn_diffusion.model.unet import build_unet
from gn_diffusion.runtime import compile_model, configure_torch, memory_format
from gn_diffusion.train.ema import EMA
from gn_diffusion.train.loop import make_accelerator, check_run, start_session
from gn_diffusion.train.step import (DIFFUSERS_SCHEDULES, TrainStep, clip_divisor, gradient_norm, learning_rate,
                                     make_optimizer, to_device)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from op_count import OpCounter  # noqa: E402 (the tests' op counter, beside them)

# The DDPM CIFAR-10 model in diffusers' terms: the attention level is the second (16x16), one
# head over all channels (attention_head_dim=None), a stride-2 padded conv to downsample and
# cos-first embeddings without a frequency shift, as GNUNet does.
DIFFUSERS_DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
DIFFUSERS_UP = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")

# The shrunk digits topology of the loop-overhead measurement.
TINY_DIGITS = ["model.image_size=8", "model.base_channels=8", "model.channel_mult=[1]", "model.num_res_blocks=1",
               "model.attention_resolutions=[]", "model.groups=4"]


@dataclass
class Contender:
    """One model and its step: step(i) runs optimizer step i and returns the loss (on the device)."""

    name: str
    model: str
    config: str
    backend: str
    params: int
    step: Callable[[int], object]
    keep: list = field(default_factory=list)  # objects the step needs alive (accelerator, EMA, ...)


def diffusers_arguments(cfg: Config) -> dict:
    """UNet2DModel arguments for a DDPM-CIFAR-shaped ModelConfig (4 levels, attention at the second)."""
    m = cfg.model
    assert len(m.channel_mult) == 4 and m.attention_resolutions == [m.image_size // 2], "DDPM CIFAR layout only"
    return dict(
        sample_size=m.image_size, in_channels=m.in_channels, out_channels=m.out_channels or m.in_channels,
        block_out_channels=tuple(m.base_channels * k for k in m.channel_mult), layers_per_block=m.num_res_blocks,
        down_block_types=DIFFUSERS_DOWN, up_block_types=DIFFUSERS_UP, attention_head_dim=None,
        norm_num_groups=m.groups, norm_eps=m.norm_eps, dropout=m.dropout,
        resnet_time_scale_shift="scale_shift" if m.scale_shift else "default",
        flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
    )


def host_batch(cfg: Config, batch: int, device: torch.device) -> dict:
    """A loader-like batch on the host (pinned on CUDA, as the real loader's), reused every step:
    the grid times models, not data loading."""
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(batch, m.in_channels, m.image_size, m.image_size, generator=gen) * 2 - 1
    labels = torch.zeros(batch, dtype=torch.long)
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
    return {"image": images, "label": labels}


def runtime(cfg: Config):
    """(accelerator, memory format) for a contender: the same accelerate state and torch settings
    (threads, cudnn.benchmark, TF32) for every model."""
    accelerator = make_accelerator(cfg)
    configure_torch(cfg.runtime)
    return accelerator, memory_format(cfg.runtime)


def diffusers_unet(cfg: Config, fmt: torch.memory_format):
    """UNet2DModel built to the config (diffusers_arguments), in training mode and layout `fmt`."""
    from diffusers import UNet2DModel

    return UNet2DModel(**diffusers_arguments(cfg)).train().to(memory_format=fmt)


def ema_of(accelerator, model, cfg: Config) -> EMA:
    t = cfg.train
    return EMA(accelerator.unwrap_model(model), t.ema_halflife_images, t.ema_rampup,
               t.images_per_step(accelerator.num_processes))


def ours(name: str, config: str, cfg: Config, batch: int) -> Contender:
    """GNUNet with the package's own TrainStep, assembled as start_session does but fed one
    pre-made batch (the CIFAR config has no data here)."""
    accelerator, fmt = runtime(cfg)
    model = build_unet(cfg.model, cfg.runtime).to(memory_format=fmt)
    params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg.train)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ema_of(accelerator, model, cfg)
    step = TrainStep(accelerator, model, compile_model(model, cfg.runtime), optimizer, ema, cfg, fmt)
    data = itertools.repeat(host_batch(cfg, batch, accelerator.device))
    return Contender(name, "GNUNet", config, cfg.runtime.backend, params,
                     lambda i: step(data, i), [accelerator, step])


def theirs(name: str, config: str, cfg: Config, batch: int) -> Contender:
    """diffusers' UNet2DModel with a hand-written step equal to TrainStep's: same draws and loss,
    same precision (accelerate's autocast), the same clipping (step.clip_divisor, inside fused
    AdamW), fused AdamW, foreach EMA: the model comparison, GNUNet against UNet2DModel with
    nothing else different."""
    accelerator, fmt = runtime(cfg)
    t = cfg.train
    model = diffusers_unet(cfg, fmt)
    params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, t)
    model, optimizer = accelerator.prepare(model, optimizer)
    forward, weights = compile_model(model, cfg.runtime), [p for p in model.parameters()]
    ema = ema_of(accelerator, model, cfg)
    host = host_batch(cfg, batch, accelerator.device)
    adamw = optimizer.optimizer

    def step(i: int):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, i)
        b = to_device(host, accelerator.device, fmt)
        generator = seeded_generator(t.seed, i, 0, device=b["image"].device)
        draws = draw_step(b["image"], cfg.diffusion.num_train_timesteps, t.label_dropout, generator)
        loss = objective(forward, b["image"], b["label"], draws, cfg)
        accelerator.backward(loss)
        if accelerator.scaler is None:  # as TrainStep; under fp16 the scaler's step would replace grad_scale
            adamw.grad_scale = clip_divisor(gradient_norm(weights), t.grad_clip)
        elif t.grad_clip:
            accelerator.clip_grad_norm_(weights, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        return loss.detach()

    return Contender(name, "UNet2DModel", config, "-", params, step, [accelerator, ema])


def example(name: str, config: str, cfg: Config, batch: int) -> Contender:
    """UNet2DModel trained the way diffusers' own example trains it
    (examples/unconditional_image_generation/train_unconditional.py), with the config's
    hyper-parameters: the product comparison, what a user of diffusers' example gets per step.

    Its recipe, in our words: noise and timesteps drawn on the device from the global RNG
    (torch.randn in the weight dtype, torch.randint), DDPMScheduler.add_noise, the float32 MSE to
    the noise; under accelerator.accumulate the backward, accelerate's clip_grad_norm_ when the
    gradients sync, then AdamW as torch builds it by default (no fused=/foreach=), prepared by
    accelerate with a get_scheduler lr schedule (prepared too) stepped every micro-batch, and
    zero_grad; diffusers' EMAModel with its warm-up and its defaults (per-parameter updates,
    foreach off) stepped when the gradients sync; and `loss.item()` logged every micro-batch, a
    host sync on a GPU. The batch is moved to the device as accelerate's loader does (blocking).
    Like the other contenders it gets the cell's compile mode (accelerate's dynamo_backend would
    compile the model the same way) and layout; the example as shipped is the eager, NCHW cell.
    Flips, which the example does in its host loader, are left out with the rest of the data."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    accelerator, fmt = runtime(cfg)
    t, accumulation = cfg.train, cfg.train.gradient_accumulation_steps
    assert cfg.diffusion.prediction_type == "epsilon", "the example's loss here is the epsilon loss"
    model = diffusers_unet(cfg, fmt)
    params = sum(p.numel() for p in model.parameters())
    decay = 0.5 ** (t.images_per_step(accelerator.num_processes) / t.ema_halflife_images)  # ours, at full length
    ema = EMAModel(model.parameters(), decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
                   model_cls=type(model), model_config=model.config)  # the example's inv_gamma and power
    noise_scheduler = make_scheduler(cfg.diffusion, "ddpm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay, eps=1e-8)  # the example's --adam_epsilon
    lr_scheduler = get_scheduler(DIFFUSERS_SCHEDULES[t.lr_schedule], optimizer=optimizer,
                                 num_warmup_steps=t.warmup_steps * accumulation,
                                 num_training_steps=t.max_steps * accumulation)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema.to(accelerator.device)
    forward = compile_model(model, cfg.runtime)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    host = host_batch(cfg, batch, accelerator.device)["image"]

    def step(i: int):
        for _ in range(accumulation):
            clean = host.to(accelerator.device).contiguous(memory_format=fmt).to(weight_dtype)
            noise = torch.randn(clean.shape, dtype=weight_dtype, device=clean.device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=clean.device).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            with accelerator.accumulate(model):
                loss = F.mse_loss(forward(noisy, timesteps).sample.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "ema_decay": ema.cur_decay_value}
            accelerator.log(logs, step=i)  # no tracker started: the example's tqdm postfix and log, less their I/O
        return loss.detach()

    return Contender(name, "UNet2DModel", config, "-", params, step, [accelerator, ema, lr_scheduler])


# ---------------------------------------------------------------------------------------------
# The loop-overhead pair: the real loop (start_session, data loading, EMA, clipping, the loss
# window and its log-step read-back) against forward + backward + AdamW on one pre-made batch


def loop_pair(threads: int, precision: str) -> tuple[Contender, Contender, Config]:
    """(whole loop, bare step) for the shrunk digits topology at batch 2, CPU, eager."""
    out = tempfile.mkdtemp(prefix="bench-loop-")  # check_run and start_session write only the lock there
    cfg = load_config("configs/digits.yaml", TINY_DIGITS + [
        "train.batch_size=2", f"train.output_dir={out}", f"train.mixed_precision='{precision}'",
        "runtime.cpu=true", f"runtime.cpu_threads={threads}", "runtime.backend=torch", "runtime.compile=none"])
    checked = check_run(cfg)
    bare_model = copy.deepcopy(checked.model)  # same weights, its own optimizer
    session = start_session(checked)
    window, log_every = [], cfg.train.log_every

    def loop(i: int):
        window.extend(session.train_step(session.batches, i))
        if (i + 1) % log_every == 0:  # run()'s log step: the one host read-back
            torch.stack(window).mean().item()
            window.clear()

    optimizer = make_optimizer(bare_model, cfg.train)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    draws = draw_step(images, cfg.diffusion.num_train_timesteps, 0.0, seeded_generator(0))
    noisy = 0.5 * images + 0.5 * draws.noise

    def bare(i: int):
        loss = F.mse_loss(bare_model(noisy, draws.timesteps).sample, draws.noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in bare_model.parameters())
    return (Contender("whole loop", "GNUNet", "digits-tiny", "torch", params, loop, [session]),
            Contender("bare step", "GNUNet", "digits-tiny", "torch", params, bare), cfg)


# ---------------------------------------------------------------------------------------------
# Measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mark(device: torch.device) -> int:
    """Bytes in use now: CUDA allocations, or the process's resident set on the CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def memory_used_since(mark: int, device: torch.device) -> int:
    """CUDA: the peak allocation above `mark`; CPU: growth of the resident set since `mark`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - mark
    return psutil.Process().memory_info().rss - mark


def timed_block(contender: Contender, first: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, host thread CPU seconds) per step over `steps` steps from step `first`."""
    sync(device)
    wall, host = time.perf_counter(), time.thread_time()
    for i in range(first, first + steps):
        contender.step(i)
    sync(device)
    return (time.perf_counter() - wall) / steps, (time.thread_time() - host) / steps


def interleaved(contenders: list[Contender], start: int, reps: int, block: int, device) -> dict[str, dict]:
    """Blocks of `block` steps, round-robin over the contenders `reps` times, so a noisy machine
    slows every contender alike; per contender its per-step wall and host times, in ms."""
    times = {c.name: {"wall_ms": [], "host_ms": []} for c in contenders}
    for rep in range(reps):
        for c in contenders:
            wall, host = timed_block(c, start + rep * block, block, device)
            times[c.name]["wall_ms"].append(wall * 1e3)
            times[c.name]["host_ms"].append(host * 1e3)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over the pairs of a_i / b_i (each pair ran back to back)."""
    return statistics.median(x / y for x, y in zip(a, b))


def launches_per_step(contender: Contender, step: int, device: torch.device) -> dict[str, int]:
    """CUDA: kernel launch calls (a CUDA graph replay is one) and kernels run in one step, from
    torch.profiler; CPU: aten ops dispatched in one step."""
    if device.type != "cuda":
        with OpCounter() as counter:
            contender.step(step)
        return {"aten_ops": counter.total}
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        contender.step(step)
        sync(device)
    events = prof.events()
    calls = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaMemcpyAsync",
             "cudaMemsetAsync")
    return {"launch_calls": sum(e.name in calls for e in events),
            "kernels": sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)}
