"""What group_norm_silu accepts: F.group_norm's rules for x, num_groups, weight and bias (shape,
dtype, device), and [N, C] floating-point scale and shift on x's device.

`check_arguments` runs every check, cached per signature (the shapes, dtypes and devices of the
tensors, and the options), so a repeated call costs building the key and one dictionary look-up.
`check_shape` is the part the Triton launch plan runs once per shape, whoever calls the kernels.
A refusal is an ArgumentError: one sentence naming the argument, what it must be and what it is.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")  # the norm's implementations (runtime.backend), not torch.compile's
# A float16 or bfloat16 x may take float32 weight and bias (F.group_norm's mixed-dtype case).
_REDUCED = (torch.float16, torch.bfloat16)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument: a ValueError as this package raises for bad arguments, and a RuntimeError
    as F.group_norm raises for the same ones, so callers written against either catch it."""


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")


def check_act(act) -> None:
    """act is True (SiLU) or False (none), nothing else, as torch's bool flags are: a truthiness
    test would take act="none" or "relu" for the SiLU without a word."""
    if type(act) is not bool:
        raise TypeError(f"act must be a bool (True: SiLU, False: no activation), got {type(act).__name__} {act!r}")


def check_shape(shape: tuple[int, ...], num_groups: int) -> None:
    """x's shape against num_groups: at least [N, C], and C channels in num_groups equal groups."""
    if len(shape) < 2:
        raise ArgumentError(f"Expected at least 2 dimensions for input tensor but received {len(shape)}: "
                            f"x of shape {tuple(shape)} must be [N, C, *spatial].")
    if num_groups < 1:
        raise ArgumentError(f"num_groups must be at least 1, got {num_groups}; pass how many groups the "
                            f"C={shape[1]} channels are split into.")
    if shape[1] % num_groups:
        raise ArgumentError(f"Expected number of channels in input to be divisible by num_groups, but got input "
                            f"of shape {tuple(shape)} and num_groups={num_groups}; choose a num_groups that "
                            f"divides C={shape[1]}.")


def wrong_shape(name: str, got: tuple[int, ...], x_shape: tuple[int, ...]) -> ArgumentError:
    """The refusal of a weight or bias ([C]) or a scale or shift ([N, C]) of another shape."""
    want = "[C]" if name in ("weight", "bias") else "[N, C]"
    size = tuple(x_shape[1:2]) if want == "[C]" else tuple(x_shape[:2])
    return ArgumentError(f"{name} must have shape {want} = {size} for x of shape {tuple(x_shape)}, "
                         f"got {tuple(got)}.")


def check_arguments(x, weight, bias, num_groups, scale, shift, act, backend) -> None:
    """Raise ArgumentError (TypeError for a num_groups that is not an int or an act that is not a
    bool) unless group_norm_silu can compute these arguments as F.group_norm would accept them."""
    if type(num_groups) is not int:  # 2.0 == 2 as a cache key: checked outside the cache
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__} {num_groups!r}")
    check_act(act)
    _check_signature(_meta(x), num_groups, backend, _meta(weight), _meta(bias), _meta(scale), _meta(shift))


def _meta(t: Optional[torch.Tensor]):
    return None if t is None else (t.shape, t.dtype, t.device)


@functools.lru_cache(maxsize=512)
def _check_signature(x, num_groups, backend, weight, bias, scale, shift) -> None:
    check_backend(backend)
    shape, dtype, device = x
    check_shape(shape, num_groups)
    if not dtype.is_floating_point:
        raise ArgumentError(f"x must be a floating-point tensor, got {dtype}.")
    named = {"weight": weight, "bias": bias, "scale": scale, "shift": shift}
    for name, meta in named.items():
        if meta is None:
            continue
        want = shape[1:2] if name in ("weight", "bias") else shape[:2]
        if meta[0] != want:
            raise wrong_shape(name, meta[0], shape)
        if meta[2] != device:
            raise ArgumentError(f"{name} is on {meta[2]} but x is on {device}; move them to one device.")
        if not meta[1].is_floating_point:
            raise ArgumentError(f"{name} must be a floating-point tensor, got {meta[1]}.")
    _check_affine_dtypes(dtype, weight, bias)


def _check_affine_dtypes(dtype: torch.dtype, weight, bias) -> None:
    """weight and bias have x's dtype, or (both) float32 for a float16 or bfloat16 x."""
    dtypes = {meta[1] for meta in (weight, bias) if meta is not None}
    if not dtypes or dtypes == {dtype} or (dtype in _REDUCED and dtypes == {torch.float32}):
        return
    allowed = f"{dtype}" + (" (or both float32)" if dtype in _REDUCED else "")
    got = " and ".join(f"{name} {meta[1]}" for name, meta in (("weight", weight), ("bias", bias)) if meta is not None)
    raise ArgumentError(f"weight and bias must be {allowed} for x of dtype {dtype}, got {got}.")
