"""Small models on a 2-core machine: one OpenMP thread is faster and does not collapse when
another process shares the CPU (measured: up to 100x slower with two threads under load).
Subprocesses the tests start inherit the setting."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the variable, so OpenMP reads it)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
