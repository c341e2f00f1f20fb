"""Exponential moving average of a model's parameters *and* buffers.

BatchNorm's running statistics are buffers: a copy whose buffers stayed frozen at their
initial values would sample badly and make a norm ablation unfair, so every floating-point
buffer is averaged like a parameter (integer buffers such as num_batches_tracked are copied).

The average is set, as in EDM (Karras et al. 2022), by a half-life in training images rather
than a decay per step, so one setting means the same average at every batch size and process
count: after `halflife` more images, an old weight's share has halved. With `rampup` the
half-life is at most that fraction of the images seen so far, so the random initial weights are
forgotten early in training.

An update is a few foreach calls over tensor lists paired once (see lerp_by_tensor, and a copy
for integer buffers), so its launches do not grow with the model's tensors, and it reads
nothing back from the device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def lerp_by_tensor(starts: list[torch.Tensor], ends: list[torch.Tensor], weight: torch.Tensor) -> None:
    """starts += weight * (ends - starts) for a 0-dim device tensor `weight`, without a host sync
    (_foreach_lerp_ with one tensor weight reads it back to the host). On the CPU a list of that
    weight is the fast form; on a GPU it would fall back to one launch per tensor, so there it is
    three fused foreach calls."""
    if weight.device.type == "cpu":
        torch._foreach_lerp_(starts, ends, [weight] * len(starts))
        return
    steps = torch._foreach_sub(ends, starts)
    torch._foreach_mul_(steps, weight)
    torch._foreach_add_(starts, steps)


class EMA:
    def __init__(self, model: nn.Module, halflife: float, rampup: float, images_per_update: int):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife = halflife
        self.rampup = rampup
        self.images_per_update = images_per_update
        self.num_updates = 0
        self._source: nn.Module | None = None
        self._floats: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        self._others: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def current_halflife(self) -> float:
        """The half-life, in images, of the next update (0 on the first update with a ramp-up:
        the average starts as a copy of the model)."""
        if not self.rampup:
            return self.halflife
        return min(self.halflife, self.rampup * self.num_updates * self.images_per_update)

    def current_decay(self) -> float:
        """The share of the average the next update keeps."""
        halflife = self.current_halflife()
        return 0.5 ** (self.images_per_update / halflife) if halflife > 0 else 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Move the averages toward `model`; not at all where the device flag `skip` is 1."""
        if model is not self._source:
            self._pair_with(model)
        averages, values = self._floats
        weight = 1 - self.current_decay()
        if averages and skip is None:
            torch._foreach_lerp_(averages, values, weight)
        elif averages:
            lerp_by_tensor(averages, values, (1 - skip) * weight)
        if self._others[0]:
            torch._foreach_copy_(*self._others)
        self.num_updates += 1

    def _pair_with(self, model: nn.Module) -> None:
        """Pair each average with the live tensor it follows (parameters and buffers are updated
        in place by training, so the pairing holds for the whole run)."""
        source = model.state_dict(keep_vars=True)
        floats, others = ([], []), ([], [])
        for name, average in self.model.state_dict(keep_vars=True).items():
            value = source[name].detach()
            pair = floats if average.is_floating_point() else others
            pair[0].append(average)
            pair[1].append(value)
        self._source, self._floats, self._others = model, floats, others

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates
