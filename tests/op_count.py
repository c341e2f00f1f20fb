"""Count what a piece of code dispatches: on a GPU every aten op is a kernel launch and every
scalar read is a host sync, so an op count taken on the CPU shows what a GPU step will cost."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device: a scalar read, and shapes that depend on values.
SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item")


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as ops: ...` then `ops.total`, `ops.syncs`, `ops.counts`."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sync_calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not name.startswith("profiler."):  # record-function markers launch nothing
            self.counts[name] += 1
            if name in SYNC_OPS or _indexes_with_a_mask(name, args):
                self.sync_calls[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_calls.values())


def _indexes_with_a_mask(name: str, args) -> bool:
    """Boolean-mask indexing (x[mask]) sizes its output by the mask's values: a sync."""
    if name not in ("aten.index", "aten.index_put", "aten.index_put_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(i is not None and getattr(i, "dtype", None) is not None and i.dtype.is_floating_point is False
               and str(i.dtype) == "torch.bool" for i in indices)
