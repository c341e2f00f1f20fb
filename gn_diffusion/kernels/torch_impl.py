"""PyTorch implementation of group_norm_silu: the numbers every other path must match."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .arguments import check_act


def group_norm_silu_torch(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act=True):
    check_act(act)
    # Opening an autocast context costs host time on every call; only do it when one is active.
    outside = torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()
    with outside:
        h = _normalized(x, num_groups, weight, bias, eps, scale, shift)
        if act:
            h = F.silu(h)
    return h.to(x.dtype)


def _normalized(x, num_groups, weight, bias, eps, scale, shift):
    """GN(x) * (1 + scale) + shift in the accumulation dtype."""
    cast = accumulating(x)
    weight, bias, scale, shift = [None if t is None else cast(t) for t in (weight, bias, scale, shift)]
    if not x.numel():  # nothing to shift; F.group_norm's own results for empty groups, gradients included
        return _modulated(F.group_norm(cast(x), num_groups, weight, bias, eps), scale, shift)
    # GN is invariant to a per-group shift; subtracting each group's first element first
    # keeps float32 statistics exact for inputs like 1e4 + 0.1 * randn (large mean, small spread).
    h = shifted_groups(x, num_groups, cast).reshape(x.shape)
    if scale is None and shift is None:
        return F.group_norm(h, num_groups, weight, bias, eps)
    # GN's affine and AdaGN folded into one per-(n, c) multiply-add: one pass, not three
    h = F.group_norm(h, num_groups, None, None, eps)
    gamma, beta = _adagn_affine(weight, bias, scale, shift)
    per_channel = (-1, x.shape[1]) + (1,) * (x.dim() - 2)  # a [C] or [N, C] tensor against x
    if gamma is None:
        return h + beta.reshape(per_channel)
    if beta is None:
        return h * gamma.reshape(per_channel)
    return torch.addcmul(beta.reshape(per_channel), h, gamma.reshape(per_channel))


def _modulated(h, scale, shift):
    """h * (1 + scale) + shift for [N, C] scale and shift, unfolded (as a caller would write it
    after F.group_norm); their shapes given in full, since N or C may be 0."""
    per_channel = h.shape[:2] + (1,) * (h.dim() - 2)
    h = h if scale is None else h * (1 + scale.reshape(per_channel))
    return h if shift is None else h + shift.reshape(per_channel)


def accumulating(x: torch.Tensor):
    """The cast to the dtype of the statistics: float32 whatever x's dtype, except float64 for a
    float64 x (as F.group_norm). Tensor.float, not .to(dtype): a quarter of the host time."""
    return torch.Tensor.double if x.dtype == torch.float64 else torch.Tensor.float


def _adagn_affine(weight, bias, scale, shift):
    """GN's affine and AdaGN folded: gamma = w (1 + s) and beta = b (1 + s) + t, in the dtype of
    the tensors given, in as few ops as the present ones allow. Each is [N, C], or [C] when there
    is no scale (and, for beta, no shift), or None: no factor (1), no offset (0)."""
    gamma, beta = weight, bias
    if scale is not None:
        one_plus = 1 + scale
        gamma = one_plus if weight is None else one_plus * weight
        beta = None if bias is None else one_plus * bias
    if shift is not None:
        beta = shift if beta is None else beta + shift
    return gamma, beta  # a [C] gamma or beta (no scale) broadcasts over the samples


def shifted_groups(x: torch.Tensor, num_groups: int, cast=torch.Tensor.float) -> torch.Tensor:
    """[N, G, Cg * HW], cast (float32 unless told): x minus its group's first element (a constant
    to autograd)."""
    grouped = cast(x).reshape(x.shape[0], num_groups, -1)
    return grouped - grouped[:, :, :1].detach()


def group_statistics(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [N, G] mean of x minus each group's first element, and 1 / sqrt(var + eps): the
    statistics the Triton forward saves for its backward."""
    var, mean = torch.var_mean(shifted_groups(x.detach(), num_groups), dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


def group_norm_silu_torch_backward(dy, x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act=True):
    """(dx, dweight, dbias, dscale, dshift) of group_norm_silu_torch in closed form, float32
    throughout (the custom op's PyTorch backward: autograd does not run inside an op's
    implementation)."""
    n, c = x.shape[:2]
    d = shifted_groups(x, num_groups)
    var, mean = torch.var_mean(d, dim=-1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = ((d - mean) * rstd).reshape(n, c, -1)
    # [C, 1] or [N, C, 1], against the [N, C, HW] view of x
    gamma, beta = _adagn_affine(*(None if t is None else t.float()[..., None] for t in (weight, bias, scale, shift)))
    dz = dy.float().reshape(n, c, -1)
    if act:
        z = xhat if gamma is None else xhat * gamma
        z = z if beta is None else z + beta
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    dxhat = (dz if gamma is None else dz * gamma).reshape(d.shape)
    xhat_g = xhat.reshape(d.shape)
    dx = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xhat_g * (dxhat * xhat_g).mean(-1, keepdim=True))
    grads = parameter_grads(dz.sum(-1), (dz * xhat).sum(-1), weight, bias, scale, shift)
    return (dx.reshape(x.shape).to(x.dtype), *grads)


def parameter_grads(sum_dz, sum_dz_xhat, weight, bias, scale, shift):
    """From per-(n, c) float32 sums of dz and dz * xhat, with z = xhat * w * (1 + s) + b * (1 + s) + t:
    dshift = sum dz, dscale = w * sum(dz xhat) + b * sum dz, and dweight/dbias sum (1 + s) times
    those over the batch (a fixed-order reduction: deterministic)."""
    one_plus = None if scale is None else 1 + scale.float()
    dweight = dbias = dscale = dshift = None
    if weight is not None:
        dweight = (sum_dz_xhat if one_plus is None else one_plus * sum_dz_xhat).sum(0).to(weight.dtype)
    if bias is not None:
        dbias = (sum_dz if one_plus is None else one_plus * sum_dz).sum(0).to(bias.dtype)
    if scale is not None:
        dscale = sum_dz_xhat if weight is None else weight.float() * sum_dz_xhat
        if bias is not None:
            dscale = dscale + bias.float() * sum_dz
        dscale = dscale.to(scale.dtype)
    if shift is not None:
        dshift = sum_dz.to(shift.dtype)
    return dweight, dbias, dscale, dshift
