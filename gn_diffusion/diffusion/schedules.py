"""The noise schedule: diffusers schedulers for a DiffusionConfig, and the forward process's
tables on the training device."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass

import torch

from ..config import DiffusionConfig, SchedulerName


_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


# sample.scheduler -> (diffusers class, options beyond the schedule). Each class keeps its own
# default timestep spacing ("leading" for ddpm/ddim, "linspace" for the rest), as in diffusers.
_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", dict(clip_sample=True)),
    "ddim": ("DDIMScheduler", dict(clip_sample=True)),
    "dpm-solver++": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),
}


SCHEDULER_NAMES = typing.get_args(SchedulerName)  # sample.scheduler's choices, in the schema's order


def make_scheduler(d: DiffusionConfig, name: str = "ddpm"):
    """A diffusers scheduler (one of SCHEDULER_NAMES) for the DiffusionConfig's schedule."""
    import diffusers

    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose {', '.join(SCHEDULER_NAMES)}")
    class_name, options = _SCHEDULERS[name]
    return getattr(diffusers, class_name)(
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=_BETA_SCHEDULES[d.beta_schedule],
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        prediction_type=d.prediction_type,
        **options,
        **_zero_snr(d),
    )


def _zero_snr(d: DiffusionConfig) -> dict:
    """A zero terminal SNR schedule; sampling must then start at the last timestep: trailing spacing."""
    return dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if d.rescale_betas_zero_snr else {}


@functools.lru_cache(maxsize=8)
def _noise_schedule(key: tuple):
    return make_scheduler(DiffusionConfig(*key), "ddpm")


def noise_schedule(d: DiffusionConfig):
    """The (cached) DDPM scheduler whose alphas define the forward process."""
    return _noise_schedule(dataclasses.astuple(d))


@dataclass(frozen=True)
class NoiseTables:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) as float32 tensors on the training device, so
    noising is two gathers and a multiply-add, with no scheduler object inside the step."""

    signal: torch.Tensor
    noise: torch.Tensor

    def at(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.signal[timesteps].view(-1, 1, 1, 1), self.noise[timesteps].view(-1, 1, 1, 1)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_bar / (1 - alpha_bar) at each timestep: 0 at a zero-SNR schedule's last one."""
        return (self.signal[timesteps] / self.noise[timesteps]) ** 2


@functools.lru_cache(maxsize=8)
def _noise_tables(key: tuple, device: torch.device) -> NoiseTables:
    alphas = _noise_schedule(key).alphas_cumprod.to(torch.float64)
    return NoiseTables(alphas.sqrt().float().to(device), (1 - alphas).sqrt().float().to(device))


def noise_tables(d: DiffusionConfig, device: torch.device | str) -> NoiseTables:
    return _noise_tables(dataclasses.astuple(d), torch.device(device))
