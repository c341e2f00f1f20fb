"""Fused GroupNorm + AdaGN scale-shift + SiLU: `act(GN(x) * (1 + scale) + shift)`.

A "backend" here is the norm's implementation (the `backend` argument, runtime.backend), never
torch.compile's backend: "torch" is the PyTorch path (plain autograd, the fast choice on the
CPU); "triton" is the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1); "auto" is Triton
for CUDA tensors when Triton is installed, else the PyTorch path. `use_triton` is the one place that
decides.

Two entry points: `group_norm_silu` checks its arguments on every call as F.group_norm does (for
external callers; see `arguments`); layers check theirs once with `check_layer` when built and
then call `group_norm_silu_unchecked`. Either way the Triton path checks, per call, what keeps its
kernels in bounds (see `triton_impl.prepare`), and an empty x (a zero-size dimension) is computed
by the PyTorch path, which gives what F.group_norm gives.
In eager mode the Triton path is a `torch.autograd.Function` (cheap on the host); under
torch.compile it is the `gn_diffusion::group_norm_silu` custom op (one opaque graph node). Both
run the same kernels and give the same bits.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from ..errors import ConfigError
from .arguments import BACKENDS, ArgumentError, check_arguments, check_backend
from .function import GroupNormSiLUFunction
from .ops import group_norm_silu_op
from .torch_impl import group_norm_silu_torch
from .triton_impl import interpreter_enabled

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


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether x goes to the Triton kernels, by norm backend: "triton" always (a ConfigError if they cannot run on
    x's device), "torch" never, "auto" for CUDA tensors when Triton is installed."""
    if backend == "triton":
        if not (x.is_cuda and TRITON_INSTALLED):  # the common case skips building a device object
            require_triton(x.device)
        return True
    return backend == "auto" and x.is_cuda and TRITON_INSTALLED


def check_layer(num_channels: int, num_groups: int, backend: str) -> None:
    """Everything a norm layer's calls would otherwise check each time, checked once when it is
    built: a known norm backend, channels divisible into groups, and Triton available if asked for."""
    check_backend(backend)
    if num_groups < 1:
        raise ArgumentError(f"num_groups must be at least 1, got {num_groups}; pass a positive group count.")
    if num_channels % num_groups:
        raise ArgumentError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups}); "
                            "choose a num_groups that divides the channels.")
    if backend == "triton":
        require_triton()


def group_norm_silu_unchecked(x, weight, bias, num_groups: int, eps: float, scale, shift, act: bool,
                              backend: str) -> torch.Tensor:
    """group_norm_silu without argument checks, for layers that ran `check_layer` when built."""
    if not use_triton(backend, x) or not x.numel():
        return group_norm_silu_torch(x, weight, bias, num_groups, eps, scale, shift, act)
    if torch.compiler.is_compiling():
        return group_norm_silu_op(x, weight, bias, scale, shift, num_groups, eps, act, True)[0]
    return GroupNormSiLUFunction.apply(x, weight, bias, scale, shift, num_groups, eps, act)


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act=True, backend="auto"):
    """y = act(GN(x; weight, bias) * (1 + scale[n, c]) + shift[n, c]), statistics in float32
    (float64 for a float64 x on the torch backend).

    x is [N, C, *spatial] of a floating dtype; weight and bias are optional [C] tensors, of x's
    dtype or float32 (as F.group_norm takes them); `act` is a bool, True for the SiLU; `scale`/`shift`
    are optional [N, C] tensors; `backend`, the norm's implementation, is auto | triton | torch. The
    output has x's dtype (and memory format, on the Triton path). Bad arguments raise
    ArgumentError (a ValueError and a RuntimeError) naming the argument, or a TypeError for a
    num_groups that is not an int or an act that is not a bool.
    act defaults to True here, the op being named for its SiLU, but to False on the norm layers
    (model.norms), which are norms first: the U-Net's attention block takes its norm plain.
    """
    check_arguments(x, weight, bias, num_groups, scale, shift, act, backend)
    return group_norm_silu_unchecked(x, weight, bias, num_groups, float(eps), scale, shift, act, backend)


__all__ = [
    "BACKENDS", "ArgumentError", "check_layer", "group_norm_silu", "group_norm_silu_torch", "group_norm_silu_unchecked",
    "require_triton", "triton_unavailable_reason", "use_triton",
]
