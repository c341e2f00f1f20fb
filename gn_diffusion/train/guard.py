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


class NonFiniteGuard:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, enabled: bool):
        self.optimizer, self.enabled = optimizer, enabled
        self.buffers = list(model.buffers())
        self.saved = [b.clone() for b in self.buffers]
        self.bad = torch.zeros((), device=device)  # 1.0 when the current step is skipped
        # Counts as floats, so each update is one op with the float flag: exact to 2^24 (16.7M)
        # steps, and float32 exists on every device (MPS has no float64).
        self.in_a_row = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)

    def start(self) -> None:
        """Before a step's first forward: remember the buffers a skipped step must restore."""
        self.bad.zero_()
        if self.enabled and self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor | None = None) -> None:
        """Mark the step bad if this micro-batch's loss (or the step's gradient norm) is not finite."""
        if not self.enabled:
            return
        value = loss if grad_norm is None else loss + grad_norm  # not finite if either is
        # 0 * value is 0 exactly when value is finite (inf and nan give nan): the flag in four
        # small ops, where isfinite alone takes four for each number.
        self.bad.masked_fill_((value * 0).ne(0), 1.0)
        self.optimizer.found_inf = self.bad  # fused AdamW skips its update where this is nonzero

    def finish(self) -> None:
        """After the optimizer step: undo a skipped step's buffer updates and count it."""
        if not self.enabled:
            return
        if self.buffers:  # where, not arithmetic: exact, and a NaN statistic must not survive
            keep_saved = self.bad.bool()
            torch._foreach_copy_(self.buffers, [torch.where(keep_saved, old, new)
                                                for old, new in zip(self.saved, self.buffers)])
        torch.addcmul(self.bad, self.in_a_row, self.bad, out=self.in_a_row)  # (in_a_row + 1) * bad
        self.skipped.add_(self.bad)

    def counts(self) -> tuple[int, int]:
        """(skipped steps in a row now, skipped steps in all): a host read, for log steps."""
        return int(self.in_a_row), int(self.skipped)
