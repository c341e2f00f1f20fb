"""Seeded randomness: every draw in training and sampling comes from a generator seeded by a
tuple of keys (seed, micro-batch index, rank; or seed, image index), never from the global RNG,
so a resumed or multi-process run draws exactly what an uninterrupted one would. (CPU and CUDA
generators draw different numbers: a run continued on another kind of device is not bit-exact.)"""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded with mixed_seed(*keys)."""
    return torch.Generator(device=device).manual_seed(mixed_seed(*keys))


def mixed_seed(*keys: int) -> int:
    """A 64-bit seed that mixes all `keys` (e.g. seed, step, rank) without collisions. Host
    arithmetic: it never waits on the device."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])
