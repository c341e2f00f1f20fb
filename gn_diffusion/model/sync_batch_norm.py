"""Batch norm whose training statistics are those of the global batch, on CPU (gloo) and CUDA.

torch's nn.SyncBatchNorm runs on CUDA only, and DDP refuses any nn.SyncBatchNorm in a CPU model,
so this is a BatchNorm2d subclass (same state-dict keys: weight, bias, running_mean, running_var,
num_batches_tracked) that synchronizes itself:

- eval mode, one process, or no process group: exactly BatchNorm2d;
- training on CUDA with several processes: torch's own SyncBatchNorm kernels;
- training on CPU with several processes: per-channel sum, sum of squares and count are
  all-reduced, and the backward all-reduces their gradients, so each process gets the input,
  weight and bias gradients of BatchNorm over the combined batch (DDP then averages the
  parameter gradients, as for any layer).

On CPU the input is centred on the running mean (the same tensor on every process) and the
sums, the normalization and its gradients run in float64; only the normalized values go back to
float32 for the affine. float32 sums of squares of activations with a large mean cancel to
noise (inputs like 1e4 + 0.1 * randn); float64 keeps them accurate even before the running mean
has caught up.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules._functions import SyncBatchNorm as _TorchSyncBatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum that every process sees is the sum of the
    processes' gradients, so the backward is the same all-reduce."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


def normalize_globally(x: torch.Tensor, shift: torch.Tensor, eps: float, group):
    """(x normalized over every process's batch, as float32; and, in float64, the per-channel
    mean, biased variance and count of that batch), all differentiable. `shift` [C] must be the
    same tensor on every process.

    x is centred in float64 too: a float32 mean near 1e4 is off by up to half an ulp (5e-4),
    an error of 5e-3 standard deviations for a spread of 0.1."""
    channels, shape = x.shape[1], (1, -1, *[1] * (x.dim() - 2))
    dims = [0, *range(2, x.dim())]
    d = x.double() - shift.detach().double().view(shape)
    count = d.new_full((1,), x.numel() // channels)
    total = _AllReduceSum.apply(torch.cat([d.sum(dims), d.square().sum(dims), count]), group)
    sums, squares, n = total[:channels], total[channels:2 * channels], total[-1]
    mean_d = sums / n
    var = (squares / n - mean_d.square()).clamp_min(0)
    normalized = ((d - mean_d.view(shape)) * torch.rsqrt(var + eps).view(shape)).float()
    return normalized, shift.detach().double() + mean_d, var, n


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the global batch of all processes in training (see the module doc)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.process_group = process_group  # None: the default (world) group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        factor = self._average_factor()
        if x.device.type != "cpu":
            return _TorchSyncBatchNorm.apply(x, self.weight, self.bias, *self._tracked(), self.eps, factor, group,
                                             dist.get_world_size(group))
        return self._cpu_forward(x, group, factor)

    def _sync_group(self):
        """The process group to synchronize over, or None where plain BatchNorm is exact."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _average_factor(self) -> float:
        """BatchNorm's running-statistics factor for this step (counting the step, as it does)."""
        if not self.track_running_stats:
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # a cumulative average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _tracked(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _cpu_forward(self, x: torch.Tensor, group, factor: float) -> torch.Tensor:
        running_mean, running_var = self._tracked()
        # The running mean is the same on every process and, once warm, near the batch mean.
        shift = running_mean if running_mean is not None else x.new_zeros(x.shape[1])
        normalized, mean, var, n = normalize_globally(x, shift, self.eps, group)
        if running_mean is not None:
            self._update_running(mean.detach(), var.detach(), n, factor)
        if self.weight is not None:
            shape = (1, -1, *[1] * (x.dim() - 2))
            normalized = normalized * self.weight.view(shape) + self.bias.view(shape)
        return normalized.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor, factor: float) -> None:
        # BatchNorm keeps the unbiased variance of the batch (here the global one).
        # Tensor arithmetic, not float(n): no read-back (a global count of 1 keeps the biased 0).
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
