"""Out-of-memory failures as the user's to fix: one sentence naming the settings to lower.

torch's CPU allocator raises a RuntimeError naming DefaultCPUAllocator, CUDA's a
torch.OutOfMemoryError (a RuntimeError too), Python and PIL a MemoryError. A failure that the
kernel settles by killing the process cannot be caught; sizes far beyond the machine fail at
allocation, which can.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from .errors import UserError

_ALLOCATOR_WORDS = ("DefaultCPUAllocator", "out of memory")  # CPU: "...: can't allocate memory" or "not enough memory"


class OutOfMemory(UserError):
    """The machine ran out of memory; the message names the settings that size the work."""

    def __str__(self) -> str:
        # A DataLoader worker's error is raised again in the main process as its own type built
        # from the worker's whole traceback text, whose last line ends in the sentence.
        return super().__str__().strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only a process that imported torch can raise its errors
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc) for words in _ALLOCATOR_WORDS)


def out_of_memory_sentence(doing: str, settings: tuple[str, ...]) -> str:
    names = settings[0] if len(settings) == 1 else f"{', '.join(settings[:-1])} or {settings[-1]}"
    return (f"ran out of memory while {doing}; lower {names} and run the command again "
            "(files already written are left as they were).")


@contextlib.contextmanager
def lower_on_oom(doing: str, *settings: str) -> Iterator[None]:
    """Inside the block, an out-of-memory error becomes an OutOfMemory naming `settings` (an
    inner block's sentence, naming the narrower settings, wins)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, UserError) or not is_out_of_memory(exc):
            raise
        raise OutOfMemory(out_of_memory_sentence(doing, settings)) from None
