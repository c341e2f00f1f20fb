"""group_norm_silu's Triton kernels as a plain `torch.autograd.Function`: the eager-mode path.

A `torch.library` custom op costs several times more host time per call than an autograd.Function
(schema parsing, dispatch, fake-tensor registration), which small training batches on a GPU feel
directly; the op is only needed where torch.compile traces the norm. Both call the same kernels
through `triton_impl`, so they give the same bits.
"""

from __future__ import annotations

import torch

from . import triton_impl


class GroupNormSiLUFunction(torch.autograd.Function):
    """apply(x, weight, bias, scale, shift, num_groups, eps, silu) -> y; any of weight, bias,
    scale and shift may be None. Saves x and the float32 [N, G] statistics for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups: int, eps: float, silu: bool):
        y, mean, rstd = triton_impl.forward(x, weight, bias, scale, shift, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zero tensor
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients have no gradient themselves
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 8
        x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
        grads = triton_impl.backward(dy, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.silu)
        return (*grads, None, None, None)
