"""Normalization layers chosen by name, all called the same way: `norm(x, scale, shift, act)`.

Every kind computes `act(norm(x) * (1 + scale) + shift)` with scale/shift of shape [N, C]
(AdaGN), so the U-Net never asks which kind it holds, and the group kinds can fuse all of it into
one kernel. Adding a kind is one decorated function: `@register_norm("name")` on a builder
`(num_channels, groups, eps, affine, backend) -> module` whose forward is
`(x, scale=None, shift=None, act=False)`; `ModulatedNorm` gives that call to any plain norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..kernels import BACKENDS, check_layer, group_norm_silu_unchecked
from ..typed import quoted
from .sync_batch_norm import SyncBatchNorm2d

NormBuilder = Callable[[int, int, float, bool, str], nn.Module]


@dataclass(frozen=True)
class _NormKind:
    build: NormBuilder
    uses_groups: bool


_REGISTRY: dict[str, _NormKind] = {}


def register_norm(name: str, *, uses_groups: bool = False) -> Callable[[NormBuilder], NormBuilder]:
    """Register a norm builder under `name`; `uses_groups` says whether model.groups applies."""

    def decorate(build: NormBuilder) -> NormBuilder:
        _REGISTRY[name] = _NormKind(build, uses_groups)
        return build

    return decorate


def available_norms() -> list[str]:
    return sorted(_REGISTRY)


def check_norm_name(kind: str, key: str = "model.norm") -> None:
    """The registry is the one judge of norm names."""
    if kind not in _REGISTRY:
        raise ConfigError(f"'{key}' is {quoted(kind)}; choose one of {', '.join(available_norms())}.")


def norm_uses_groups(kind: str) -> bool:
    check_norm_name(kind)
    return _REGISTRY[kind].uses_groups


def make_norm(kind: str, num_channels: int, *, groups: int = 32, eps: float = 1e-5, affine: bool = True,
              backend: str = "auto") -> nn.Module:
    check_norm_name(kind)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return _REGISTRY[kind].build(num_channels, groups, eps, affine, backend)


def modulate(h: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], act: bool) -> torch.Tensor:
    """act(h * (1 + scale) + shift) for a normalized h and [N, C] scale/shift (either may be None)."""
    if scale is not None:
        h = h * (1 + scale[:, :, None, None].to(h.dtype))
    if shift is not None:
        h = h + shift[:, :, None, None].to(h.dtype)
    return F.silu(h) if act else h


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are float32 whatever the input dtype (improved-diffusion's
    GroupNorm32), fused with AdaGN and SiLU; its output has the input's dtype. `backend` picks
    the group_norm_silu implementation (auto | triton | torch); `bias` and `factory` (device,
    dtype) are nn.GroupNorm's."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 backend: str = "auto", *, bias: bool = True, **factory):
        check_layer(num_channels, num_groups, backend)  # once here, so forward checks nothing
        # Only recent torch versions take nn.GroupNorm(bias=...): a layer without one drops it here.
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **factory)
        if affine and not bias:
            self.register_parameter("bias", None)
        self.backend = backend

    def forward(self, x, scale=None, shift=None, act: bool = False) -> torch.Tensor:
        return group_norm_silu_unchecked(x, self.weight, self.bias, self.num_groups, self.eps, scale, shift, act,
                                         self.backend)


class BatchNorm(nn.BatchNorm2d):
    def forward(self, x, scale=None, shift=None, act: bool = False) -> torch.Tensor:
        return modulate(super().forward(x), scale, shift, act)


class SyncBatchNorm(SyncBatchNorm2d):
    """Batch norm over the global batch of every process, on CPU (gloo) as on CUDA; a
    BatchNorm2d, so its files are those of `batch` (see sync_batch_norm)."""

    def forward(self, x, scale=None, shift=None, act: bool = False) -> torch.Tensor:
        return modulate(super().forward(x), scale, shift, act)


class ModulatedNorm(nn.Module):
    """Any plain norm module (or none) with the (x, scale, shift, act) call."""

    def __init__(self, norm: Optional[nn.Module] = None):
        super().__init__()
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x, scale=None, shift=None, act: bool = False) -> torch.Tensor:
        return modulate(self.norm(x), scale, shift, act)


@register_norm("group", uses_groups=True)
def _group(num_channels: int, groups: int, eps: float, affine: bool, backend: str) -> nn.Module:
    return GroupNorm32(groups, num_channels, eps=eps, affine=affine, backend=backend)


@register_norm("layer")
def _layer(num_channels: int, groups: int, eps: float, affine: bool, backend: str) -> nn.Module:
    # Statistics over (C, H, W) per sample with a per-channel affine: GroupNorm with one group.
    return GroupNorm32(1, num_channels, eps=eps, affine=affine, backend=backend)


@register_norm("instance")
def _instance(num_channels: int, groups: int, eps: float, affine: bool, backend: str) -> nn.Module:
    # Per-sample, per-channel statistics in train and eval alike (no running statistics).
    return GroupNorm32(num_channels, num_channels, eps=eps, affine=affine, backend=backend)


@register_norm("batch")
def _batch(num_channels: int, groups: int, eps: float, affine: bool, backend: str) -> nn.Module:
    return BatchNorm(num_channels, eps=eps, affine=affine)


@register_norm("sync_batch")
def _sync_batch(num_channels: int, groups: int, eps: float, affine: bool, backend: str) -> nn.Module:
    return SyncBatchNorm(num_channels, eps=eps, affine=affine)


@register_norm("none")
def _none(num_channels: int, groups: int, eps: float, affine: bool, backend: str) -> nn.Module:
    return ModulatedNorm()
