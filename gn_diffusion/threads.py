"""torch's CPU thread count: the one place that sets it (runtime.cpu_threads)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .errors import ConfigError


def check_cpu_threads(count: int) -> None:
    """A ConfigError when `count` threads are more than this machine's logical CPUs (threads
    beyond them only wait for each other, and a huge count fails deep inside OpenMP's users)."""
    cpus = os.cpu_count() or 1
    if count > cpus:
        raise ConfigError(f"'runtime.cpu_threads' is {count} but this machine has {cpus} logical CPUs; "
                          f"set runtime.cpu_threads={cpus} or fewer (0 keeps torch's default).")


def set_cpu_threads(count: int) -> None:
    """Use `count` torch CPU threads from now on (0: leave torch's setting as it is)."""
    check_cpu_threads(count)
    if count:
        torch.set_num_threads(count)


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Use `count` torch CPU threads inside the block (0: leave as is), then restore.

    Small networks on a busy 2-core machine ran many times faster on one thread than on two
    spinning OpenMP threads (the digits classifier's training: 4 s instead of 40 s).
    """
    before = torch.get_num_threads()
    set_cpu_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
