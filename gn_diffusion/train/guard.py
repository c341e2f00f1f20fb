"""Skip, on the device, a step whose loss or gradient norm is not finite.

A skipped step leaves everything as it was before it: fused AdamW takes the flag as `found_inf`
and leaves parameters, moments and step counts alone; BatchNorm's running statistics (small) are
restored from a copy taken before the forward; the EMA does not move. The flag and the counts stay
on the device, so the guard adds no host sync; the loop reads them on log and checkpoint steps.
Under fp16 the flag covers the loss scaler's own skips too: the norm is taken of the unscaled
gradients, so one that overflowed makes it non-finite, and such a step is skipped and counted.

Its own module, though only the step uses it, because it holds state that outlives a step (the
buffers' copy, the flag, the counts the loop reads) and step.py reads better calling its three
moments by name: start, judge, finish.
"""

from __future__ import annotations

import torch
from torch import nn


class NonFiniteGuard:
    def __init__(self, model: nn.Module, device: torch.device):
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
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def judge(self, losses: list[torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Mark the step bad if a micro-batch's loss or the step's gradient norm is not finite."""
        value = grad_norm
        for loss in losses:
            value = value + loss  # not finite if any term is
        # 0 * value is 0 exactly when value is finite (inf and nan give nan): the flag in three
        # small ops, where isfinite alone takes four.
        self.bad.masked_fill_((value * 0).ne(0), 1.0)

    def finish(self) -> None:
        """After the optimizer step: undo a skipped step's buffer updates and count it."""
        if self.buffers:  # where, not arithmetic: exact, and a NaN statistic must not survive
            keep_saved = self.bad.bool()
            torch._foreach_copy_(self.buffers, [torch.where(keep_saved, old, new)
                                                for old, new in zip(self.saved, self.buffers)])
        torch.addcmul(self.bad, self.in_a_row, self.bad, out=self.in_a_row)  # (in_a_row + 1) * bad
        self.skipped.add_(self.bad)

    def counts(self) -> tuple[int, int]:
        """(skipped steps in a row now, skipped steps in all): a host read, for log steps."""
        return int(self.in_a_row), int(self.skipped)
