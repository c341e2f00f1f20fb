"""Exponential moving average of a model's parameters *and* buffers.

BatchNorm's running statistics are buffers: a copy whose buffers stayed frozen at their
initial values would sample badly and make a norm ablation unfair, so every floating-point
buffer is averaged like a parameter (integer buffers such as num_batches_tracked are copied).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay of the next update; with warm-up it ramps as (1 + n) / (10 + n) so the
        average is not dominated by the random initial weights early in training."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        source = model.state_dict()
        for name, average in self.model.state_dict().items():
            value = source[name].detach()
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1 - decay)
            else:
                average.copy_(value)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state)
        self.num_updates = num_updates
