"""One optimizer step that never waits on the host.

Everything a step touches stays on the training device: batches arrive from pinned memory without
blocking, the random draws come from a device generator, the gradient norm is torch's foreach
norm, AdamW is the fused kernel (it takes the clip as its gradient divisor and the guard's skip
flag, and reads no scalars back), and the EMA is a few foreach calls. The losses stay on the
device until a log step asks for them, so the only host syncs are on steps that log, checkpoint
or sample.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator

import torch
from torch import nn

from ..config import Config, TrainConfig
from ..diffusion.objective import training_loss
from ..diffusion.schedules import noise_tables
from ..diffusion.seeding import mixed_seed
from ..errors import ConfigError
from ..images import from_uint8
from .ema import EMA
from .guard import NonFiniteGuard


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW: the guard's skip flag needs its `found_inf` (check_fused_adamw refuses a
    device without it before a run writes anything)."""
    return torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                             weight_decay=t.weight_decay, fused=True)


def check_fused_adamw(device: torch.device) -> None:
    """A ConfigError where torch has no fused AdamW for float32 parameters on `device`: foreach
    AdamW cannot skip a non-finite step without reading the flag back, and training on without
    the skip would break the guard's promise."""
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except RuntimeError:
        raise ConfigError(f"torch {torch.__version__} has no fused AdamW on {device.type}, which the non-finite "
                          "guard needs to skip a bad step on the device; set runtime.cpu=true or train on a CUDA "
                          "device.") from None


def learning_rate(cfg: Config, step: int) -> float:
    """train.lr times diffusers' schedule (train.lr_schedule, after a linear warm-up over
    train.warmup_steps) at step + 1, so step 0 already trains; a pure function of the step, so
    a resumed run continues the schedule exactly."""
    t = cfg.train
    return t.lr * _schedule(t.lr_schedule, t.warmup_steps, t.max_steps)(step + 1)


# train.lr_schedule's names (TrainConfig's Literal; a test keeps the two equal) to diffusers'.
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


def gradient_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The total norm of the parameters' gradients, on the device."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


def clip_divisor(norm: torch.Tensor, clip: float) -> torch.Tensor | None:
    """What fused AdamW divides every gradient by (its `grad_scale`) to clip as clip_grad_norm_
    does, by min(1, clip / (norm + 1e-6)), inside its own step: no pass over the gradients of
    its own. None without a clip."""
    return torch.clamp((norm.float() + 1e-6) / clip, min=1.0) if clip else None  # the kernels read float32


class TrainStep:
    """Forward and backward over train.gradient_accumulation_steps micro-batches, then one
    clipped AdamW step and the EMA update, all skipped where the guard finds a non-finite loss
    or gradient norm."""

    def __init__(self, accelerator, model: nn.Module, forward: Callable, optimizer, ema: EMA, cfg: Config,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.accelerator, self.model, self.forward, self.ema = accelerator, model, forward, ema
        self.cfg, self.memory_format = cfg, memory_format
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.unwrapped = accelerator.unwrap_model(model)
        self.tables = noise_tables(cfg.diffusion, accelerator.device)
        # accelerate's optimizer wrapper costs ~0.8 ms of host Python a step (a package look-up
        # among it) and, under fp16, would let the loss scaler replace our skip flag with its own.
        self.adamw = getattr(optimizer, "optimizer", optimizer)
        self.guard = NonFiniteGuard(self.unwrapped, accelerator.device)
        self.generator = torch.Generator(device=accelerator.device)  # reseeded for every micro-batch

    def __call__(self, data: Iterator[dict], step: int) -> list[torch.Tensor]:
        """Optimizer step number `step` (0-based); the micro-batches' losses, still on the device."""
        t, accelerator, scaler = self.cfg.train, self.accelerator, self.accelerator.scaler
        for group in self.adamw.param_groups:
            group["lr"] = learning_rate(self.cfg, step)
        self.guard.start()
        losses = []
        first = step * t.gradient_accumulation_steps
        for micro in range(first, first + t.gradient_accumulation_steps):
            batch = to_device(next(data), accelerator.device, self.memory_format)
            generator = self.generator.manual_seed(mixed_seed(t.seed, micro, accelerator.process_index))
            with accelerator.accumulate(self.model):  # under DDP, gradients sync on the last micro-batch only
                loss = training_loss(self.forward, batch, self.cfg, generator, self.tables)
                self._backward(loss)
            losses.append(loss.detach())
        if scaler is not None:  # fp16: the true gradients, for the norm and the clip
            scaler.unscale_(self.adamw)
        norm = gradient_norm(self.params)
        self.guard.judge(losses, norm)
        self.adamw.found_inf = self.guard.bad  # where nonzero, fused AdamW leaves weights and moments alone
        self.adamw.grad_scale = clip_divisor(norm, t.grad_clip)
        self.adamw.step()
        if scaler is not None:  # its own found_inf (overflowed gradients, a subset of ours) sets the next scale
            scaler.update()
        self.adamw.zero_grad(set_to_none=True)
        self.guard.finish()
        self.ema.update(self.unwrapped, self.guard.bad)
        return losses

    def _backward(self, loss: torch.Tensor) -> None:
        """What accelerator.backward does for the runs we make (no DeepSpeed or Megatron): the
        loss over the accumulation steps, through the loss scaler under fp16. Its own version
        divides by 1 without accumulation too, which is two launches a step for nothing."""
        steps = self.cfg.train.gradient_accumulation_steps
        if steps > 1:
            loss = loss / steps
        scaler = self.accelerator.scaler
        (loss if scaler is None else scaler.scale(loss)).backward()
