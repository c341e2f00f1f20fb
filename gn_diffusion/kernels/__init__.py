"""Fused GroupNorm + AdaGN scale-shift + SiLU: `act(GN(x) * (1 + scale) + shift)`.

Backends: "torch" is the PyTorch reference (plain autograd, the fast choice on the CPU); "triton"
is the Triton kernels behind the `gn_diffusion::group_norm_silu` custom op (CUDA, or the CPU under
TRITON_INTERPRET=1); "auto" is Triton for CUDA tensors when Triton is installed, else the reference.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ..errors import ConfigError
from .ops import group_norm_silu_op
from .reference import group_norm_silu_reference
from .triton_impl import interpreter_enabled

BACKENDS = ("auto", "triton", "torch")


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the Triton kernels cannot run here (on `device`, default: this machine), or None."""
    if not TRITON_INSTALLED:
        return "Triton is not installed"
    if interpreter_enabled():
        return None
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if not on_cuda:
        return "there is no CUDA device" if device is None else f"the tensors are on {device.type}, not CUDA"
    return None


def require_triton(device: Optional[torch.device] = None) -> None:
    """Raise a ConfigError naming the fix when runtime.backend=triton cannot run."""
    reason = triton_unavailable_reason(device)
    if reason:
        raise ConfigError(
            f"runtime.backend is 'triton' but {reason}; set runtime.backend=auto (Triton on CUDA, PyTorch "
            "elsewhere) or torch, or set TRITON_INTERPRET=1 to emulate the kernels on the CPU (slow)."
        )


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu", backend="auto"):
    """y = act(GN(x; weight, bias) * (1 + scale[n, c]) + shift[n, c]), statistics in float32.

    `act` is "silu" or None; `scale`/`shift` are optional [N, C] tensors; `backend` is
    auto | triton | torch. The output has x's dtype (and memory format, on the Triton path).
    """
    _check_arguments(x, num_groups, scale, shift, act, backend)
    if backend == "triton":
        require_triton(x.device)
    elif backend == "torch" or not (x.is_cuda and TRITON_INSTALLED):
        return group_norm_silu_reference(x, weight, bias, num_groups, eps, scale, shift, act)
    y, _, _ = group_norm_silu_op(x, weight, bias, scale, shift, num_groups, eps, act == "silu", True)
    return y


def _check_arguments(x, num_groups, scale, shift, act, backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if act not in ("silu", None):
        raise ValueError(f"act must be 'silu' or None, got {act!r}")
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"x of shape {tuple(x.shape)} needs channels (dim 1) divisible by num_groups={num_groups}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} must have shape [N, C] = {tuple(x.shape[:2])}, got {tuple(t.shape)}")


__all__ = [
    "BACKENDS", "group_norm_silu", "group_norm_silu_reference", "require_triton", "triton_unavailable_reason",
]
