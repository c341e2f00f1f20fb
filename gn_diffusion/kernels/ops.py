"""group_norm_silu as a `torch.library` custom op, so `torch.compile` keeps it as one node.

`gn_diffusion::group_norm_silu` returns (y, mean, rstd) and `gn_diffusion::group_norm_silu_backward`
the five gradients; each has a fake implementation for tracing. The op's `use_triton` argument
picks the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1) or the PyTorch path, on
any device. Eager calls take `function.GroupNormSiLUFunction` instead, which is cheaper on the
host; the op is what torch.compile sees.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_impl
from .torch_impl import group_norm_silu_torch, group_norm_silu_torch_backward, group_statistics


def _layout_like(x: Tensor) -> Tensor:
    """An empty tensor laid out as the kernels lay out outputs for x."""
    return torch.empty_like(triton_impl.dense_layout(x)[0]) if x.numel() else torch.empty_like(x)


def _grads_or_empty(grads, like: Tensor) -> list[Tensor]:
    # A custom op cannot return None; an absent parameter's gradient travels as an empty tensor.
    return [g if g is not None else like.new_empty(0) for g in grads]


@torch.library.custom_op("gn_diffusion::group_norm_silu", mutates_args=())
def group_norm_silu_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], num_groups: int, eps: float, act: bool, use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if use_triton:
        return triton_impl.forward(x, weight, bias, scale, shift, num_groups, eps, act)
    y = group_norm_silu_torch(x, weight, bias, num_groups, eps, scale, shift, act)
    mean, rstd = group_statistics(x, num_groups, eps)
    return _layout_like(x).copy_(y), mean, rstd


@group_norm_silu_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, act, use_triton):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return _layout_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("gn_diffusion::group_norm_silu_backward", mutates_args=())
def group_norm_silu_backward_op(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale: Optional[Tensor],
    shift: Optional[Tensor], mean: Tensor, rstd: Tensor, num_groups: int, eps: float, act: bool,
    use_triton: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if use_triton:
        dx, *grads = triton_impl.backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, act)
    else:
        dx, *grads = group_norm_silu_torch_backward(dy, x, weight, bias, num_groups, eps, scale, shift, act)
        dx = _layout_like(x).copy_(dx)
    return (dx, *_grads_or_empty(grads, x))


@group_norm_silu_backward_op.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, eps, act, use_triton):
    grads = [None if t is None else torch.empty_like(t) for t in (weight, bias, scale, shift)]
    return (_layout_like(x), *_grads_or_empty(grads, x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, act, use_triton = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.options = (num_groups, eps, act, use_triton)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # mean and rstd get no gradient: do not zero-fill one


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return (None,) * 9
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    grads = group_norm_silu_backward_op(dy, x, weight, bias, scale, shift, mean, rstd, *ctx.options)
    present = [True] + [t is not None for t in (weight, bias, scale, shift)]
    return (*(g if keep else None for g, keep in zip(grads, present)), None, None, None, None)


group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)
