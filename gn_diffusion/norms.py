"""Normalization layers chosen by name, and the one norm+activation call site of the U-Net.

Adding a kind is one decorated function: `@register_norm("name")` on a builder
`(num_channels, groups, eps, affine) -> nn.Module`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import group_norm_silu

NormBuilder = Callable[[int, int, float, bool], nn.Module]


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


def norm_uses_groups(kind: str) -> bool:
    return _REGISTRY[kind].uses_groups


def make_norm(kind: str, num_channels: int, *, groups: int = 32, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown norm kind {kind!r}; choose one of {', '.join(available_norms())}.")
    return _REGISTRY[kind].build(num_channels, groups, eps, affine)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are float32 whatever the input dtype (improved-diffusion's
    GroupNorm32); its output has the input's dtype. `kernels` picks the implementation."""

    kernels: str = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_act(x, act=False)

    def forward_act(self, x, scale=None, shift=None, act: bool = True) -> torch.Tensor:
        return group_norm_silu(
            x, self.weight, self.bias, self.num_groups, self.eps, scale=scale, shift=shift,
            act="silu" if act else None, backend=self.kernels,
        )


@register_norm("group", uses_groups=True)
def _group(num_channels: int, groups: int, eps: float, affine: bool) -> nn.Module:
    return GroupNorm32(groups, num_channels, eps=eps, affine=affine)


@register_norm("layer")
def _layer(num_channels: int, groups: int, eps: float, affine: bool) -> nn.Module:
    # Statistics over (C, H, W) per sample with a per-channel affine: GroupNorm with one group.
    return GroupNorm32(1, num_channels, eps=eps, affine=affine)


@register_norm("instance")
def _instance(num_channels: int, groups: int, eps: float, affine: bool) -> nn.Module:
    # Per-sample, per-channel statistics in train and eval alike (no running statistics).
    return GroupNorm32(num_channels, num_channels, eps=eps, affine=affine)


@register_norm("batch")
def _batch(num_channels: int, groups: int, eps: float, affine: bool) -> nn.Module:
    return nn.BatchNorm2d(num_channels, eps=eps, affine=affine)


@register_norm("sync_batch")
def _sync_batch(num_channels: int, groups: int, eps: float, affine: bool) -> nn.Module:
    return nn.SyncBatchNorm(num_channels, eps=eps, affine=affine)


@register_norm("none")
def _none(num_channels: int, groups: int, eps: float, affine: bool) -> nn.Module:
    return nn.Identity()


def norm_act(
    norm: nn.Module,
    x: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    act: bool = True,
) -> torch.Tensor:
    """`silu(norm(x) * (1 + scale) + shift)` with scale/shift of shape [N, C] (AdaGN).

    Every norm+activation of the U-Net goes through here, so the fused GroupNorm+SiLU kernel
    replaces all of them at once.
    """
    if isinstance(norm, GroupNorm32):
        return norm.forward_act(x, scale, shift, act)
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale[:, :, None, None].to(h.dtype))
    if shift is not None:
        h = h + shift[:, :, None, None].to(h.dtype)
    return F.silu(h) if act else h


def set_kernels(model: nn.Module, kernels: str) -> None:
    """Choose the group_norm_silu implementation (auto | triton | torch) for every group norm."""
    for module in model.modules():
        if isinstance(module, GroupNorm32):
            module.kernels = kernels
