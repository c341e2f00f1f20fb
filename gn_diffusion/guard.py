"""Skip, on the device, a step whose loss or gradient norm is not finite.

A skipped step leaves everything as it was before it: fused AdamW takes the flag as `found_inf`
and leaves parameters, moments and step counts alone; BatchNorm's running statistics (small) are
restored from a copy taken before the forward; the EMA does not move. The flag and the counts stay
on the device, so the guard adds no host sync; the loop reads them on log and checkpoint steps.
Under fp16 the loss scaler already skips such steps while it finds its scale, and those skips
are not counted.
"""

from __future__ import annotations

import torch
from torch import nn

from .ema import lerp_by_tensor


class NonFiniteGuard:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, enabled: bool):
        self.optimizer, self.enabled = optimizer, enabled
        buffers = [b for b in model.buffers()]
        self.floats = [b for b in buffers if b.is_floating_point()]
        self.others = [b for b in buffers if not b.is_floating_point()]
        self.saved_floats = [b.clone() for b in self.floats]
        self.saved_others = [b.clone() for b in self.others]
        self.bad = torch.zeros((), device=device)  # 1.0 when the current step is skipped
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def start(self) -> None:
        """Before a step's first forward: remember the buffers a skipped step must restore."""
        self.bad.zero_()
        if self.enabled and self.floats:
            torch._foreach_copy_(self.saved_floats, self.floats)
        if self.enabled and self.others:
            torch._foreach_copy_(self.saved_others, self.others)

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """Mark the step bad if this micro-batch's loss (or the step's gradient norm) is not finite."""
        if not self.enabled:
            return
        bad = ~torch.isfinite(loss)
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm)
        torch.maximum(self.bad, bad.float(), out=self.bad)
        self.optimizer.found_inf = self.bad  # fused AdamW skips its update where this is nonzero

    def finish(self) -> None:
        """After the optimizer step: undo a skipped step's buffer updates and count it."""
        if not self.enabled:
            return
        if self.floats:
            lerp_by_tensor(self.floats, self.saved_floats, self.bad)
        bad = self.bad.long()
        if self.others:  # integer buffers (BatchNorm's batch count): b * saved + (1 - b) * now
            torch._foreach_mul_(self.others, 1 - bad)
            torch._foreach_add_(self.others, torch._foreach_mul(self.saved_others, bad))
        self.in_a_row.add_(1).mul_(bad)
        self.skipped.add_(bad)

    def counts(self) -> tuple[int, int]:
        """(skipped steps in a row now, skipped steps in all): a host read, for log steps."""
        return int(self.in_a_row), int(self.skipped)
