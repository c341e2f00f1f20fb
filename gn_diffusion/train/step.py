"""One optimizer step that never waits on the host.

Everything a step touches stays on the training device: batches arrive from pinned memory without
blocking, the random draws come from a device generator, clipping uses torch's foreach norm,
AdamW is the fused kernel (it reads no scalars back), and the EMA is a few foreach calls. The loss
stays on the device until a log step asks for it, so the only host syncs are on steps that log,
checkpoint or sample.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import Config, TrainConfig
from ..diffusion.draws import draw_step
from ..diffusion.objective import objective
from ..diffusion.schedules import noise_tables
from ..diffusion.seeding import mixed_seed
from ..images import from_uint8
from .ema import EMA
from .guard import NonFiniteGuard


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch has the kernel for these parameters (CUDA and CPU), else foreach."""
    options = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **options)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(model.parameters(), foreach=True, **options)


def learning_rate(cfg: Config, step: int) -> float:
    """train.lr times diffusers' schedule (train.lr_schedule, after a linear warm-up over
    train.warmup_steps) at step + 1, so step 0 already trains; a pure function of the step, so
    a resumed run continues the schedule exactly."""
    t = cfg.train
    return t.lr * _schedule(t.lr_schedule, t.warmup_steps, t.max_steps)(step + 1)


DIFFUSERS_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@functools.lru_cache(maxsize=8)
def _schedule(name: str, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    from diffusers.optimization import get_scheduler

    holder = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # the lambda needs an optimizer to attach to
    return get_scheduler(DIFFUSERS_SCHEDULES[name], holder, num_warmup_steps=warmup_steps,
                         num_training_steps=max_steps).lr_lambdas[0]


def to_device(batch: dict, device: torch.device, memory_format: torch.memory_format) -> dict:
    """A loader batch on the training device: copied without blocking (from pinned memory on
    CUDA), images converted from uint8 there rather than item by item on the host."""
    images = batch["image"].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = from_uint8(images)
    return {"image": images.contiguous(memory_format=memory_format),
            "label": batch["label"].to(device, non_blocking=True)}


class TrainStep:
    """Forward, backward, clipping and AdamW over train.gradient_accumulation_steps
    micro-batches, then the EMA update."""

    def __init__(self, accelerator, model: nn.Module, forward: Callable, optimizer, ema: EMA, cfg: Config,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.accelerator, self.model, self.forward, self.optimizer, self.ema = accelerator, model, forward, optimizer, ema
        self.cfg, self.memory_format = cfg, memory_format
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.unwrapped = accelerator.unwrap_model(model)
        self.tables = noise_tables(cfg.diffusion, accelerator.device)
        # accelerate's optimizer wrapper costs ~0.8 ms of host Python a step (a package look-up
        # among it); the step below does what it does for us: step only when gradients are
        # synchronized, through the loss scaler under fp16.
        self.adamw = getattr(optimizer, "optimizer", optimizer)
        self.one_group = len({(p.device, p.dtype) for p in self.params}) == 1
        unscaled_fused = fused_without_scaler(self.adamw, accelerator)
        self.guard = NonFiniteGuard(self.unwrapped, self.adamw, accelerator.device, enabled=unscaled_fused)
        self.clip_in_adamw = unscaled_fused and self.one_group
        self.generator = torch.Generator(device=accelerator.device)  # reseeded for every micro-batch

    def __call__(self, data: Iterator[dict], step: int) -> list[torch.Tensor]:
        """Optimizer step number `step` (0-based); the micro-batches' losses, still on the device."""
        t = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, step)
        losses = []
        first = step * t.gradient_accumulation_steps
        self.guard.start()
        for micro in range(first, first + t.gradient_accumulation_steps):
            losses.append(self._micro_step(next(data), micro))
        self.guard.finish()
        self.ema.update(self.unwrapped, self.guard.bad if self.guard.enabled else None)
        return losses

    def _micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        t, accelerator = self.cfg.train, self.accelerator
        batch = to_device(batch, accelerator.device, self.memory_format)
        images = batch["image"]
        generator = self.generator.manual_seed(mixed_seed(t.seed, micro, accelerator.process_index))
        d = self.cfg.diffusion
        draws = draw_step(images, d.num_train_timesteps, t.label_dropout, generator, d.offset_noise,
                          self.cfg.data.random_crop)
        with accelerator.accumulate(self.model):
            loss = objective(self.forward, images, batch["label"], draws, self.cfg, self.tables)
            self._backward(loss)
            norm = self._clip_gradients() if accelerator.sync_gradients else None
            self.guard.judge(loss.detach(), norm)
            if accelerator.sync_gradients:
                self._optimizer_step()
        return loss.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        """What accelerator.backward does for the runs we make (no DeepSpeed or Megatron): the
        loss over the accumulation steps, through the loss scaler under fp16. Its own version
        divides by 1 without accumulation too, which is two launches a step for nothing."""
        steps = self.cfg.train.gradient_accumulation_steps
        if steps > 1:
            loss = loss / steps
        scaler = self.accelerator.scaler
        (loss if scaler is None else scaler.scale(loss)).backward()

    def _optimizer_step(self) -> None:
        scaler = self.accelerator.scaler
        if scaler is None:
            self.adamw.step()
            self.adamw.grad_scale = None  # this step's clip; a GradScaler would multiply a stale one in
        else:
            scaler.step(self.adamw)
            scaler.update()
        self.adamw.zero_grad(set_to_none=True)

    def _clip_gradients(self) -> torch.Tensor:
        """The total gradient norm (on the device), the gradients clipped to train.grad_clip."""
        clip = self.cfg.train.grad_clip
        if self.accelerator.scaler is not None:  # fp16: clip the true gradients
            self.accelerator.scaler.unscale_(self.adamw)
        if not self.one_group:  # torch groups the tensors by device and dtype itself
            return torch.nn.utils.clip_grad_norm_(self.params, clip or float("inf"), foreach=True)
        return clip_gradients(self.params, clip, self.adamw if self.clip_in_adamw else None)


def fused_without_scaler(adamw: torch.optim.Optimizer, accelerator) -> bool:
    """Whether `adamw` (the torch optimizer itself) is fused and runs without a loss scaler: then
    its step takes a device skip flag (found_inf) and a gradient divisor (grad_scale) of ours."""
    return bool(adamw.defaults.get("fused")) and accelerator.scaler is None


def clip_gradients(params: list[nn.Parameter], clip: float, fused_adamw=None) -> torch.Tensor:
    """The total norm of the parameters' gradients (on their one device and dtype), and the
    gradients scaled by min(1, clip / (norm + 1e-6)) when `clip` is nonzero, as clip_grad_norm_
    does. Given `fused_adamw` (fused, without a loss scaler), the optimizer does the scaling: it
    divides every gradient by its `grad_scale` inside its next step, so clipping costs no pass
    over the gradients of its own."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if clip and fused_adamw is not None:
        fused_adamw.grad_scale = torch.clamp((total.float() + 1e-6) / clip, min=1.0)  # the kernels read float32
    elif clip:
        torch._foreach_mul_(grads, torch.clamp(clip / (total + 1e-6), max=1.0))
    return total
