"""group_norm_silu's Triton kernels as a plain `torch.autograd.Function`: the eager-mode path.

A `torch.library` custom op costs several times more host time per call than an autograd.Function
(schema parsing, dispatch, fake-tensor registration), which small training batches on a GPU feel
directly; the op is only needed where torch.compile traces the norm. Both call the same kernels
through `triton_impl`, so they give the same bits. What the forward's `triton_impl.prepare` works
out (the kernel launch plan, layout, flags and sizes) is kept for its backward, so a norm's host
work is done once per step, not twice.
(For an x that is neither NCHW- nor channels_last-dense, that keeps the forward's dense copy
alive until the backward instead of copying again: the U-Net never makes one.)
"""

from __future__ import annotations

import torch

from . import triton_impl


class GroupNormSiLUFunction(torch.autograd.Function):
    """apply(x, weight, bias, scale, shift, num_groups, eps, act) -> y; any of weight, bias,
    scale and shift may be None. Saves x and the float32 [N, G] statistics for the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, num_groups: int, eps: float, act: bool):
        prepared = triton_impl.prepare(x, weight, bias, scale, shift, num_groups)
        y, mean, rstd = triton_impl.forward_prepared(prepared, eps, act)
        # Its tensors go through save_for_backward, which refuses a backward after they were
        # modified in place; the rest is kept on ctx.
        ctx.save_for_backward(prepared.x, *prepared.params, mean, rstd)
        ctx.prepared, ctx.act = prepared._replace(x=None, params=None), act
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zero tensor
        return y

    @staticmethod
    def backward(ctx, dy):
        # once_differentiable's wrapper costs more host time than the rest of this method, so it
        # is only paid where it matters: a backward that builds a graph (create_graph=True),
        # whose results then refuse a second differentiation (the kernels have no gradient).
        if torch.is_grad_enabled():
            return _backward_building_a_graph(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx, dy):
    if dy is None:
        return (None,) * 8
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    prepared = ctx.prepared._replace(x=x, params=(weight, bias, scale, shift))
    grads = triton_impl.backward_prepared(prepared, dy, mean, rstd, ctx.act)
    return (*grads, None, None, None)


_backward_building_a_graph = torch.autograd.function.once_differentiable(_backward)
