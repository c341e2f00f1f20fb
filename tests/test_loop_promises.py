"""Three promises of the training loop that nothing else defends: the logged loss ignores skipped
steps' non-finite losses, non-finite weights are refused before they are written, and images/s
counts what it says over the time it says."""

import math
from types import SimpleNamespace

import pytest
import torch

import gn_diffusion.train.loop as loop
from gn_diffusion.errors import UserError


def test_the_logged_loss_is_the_mean_of_the_finite_losses():
    losses = [torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(3.0), torch.tensor(math.inf)]
    assert loop.finite_mean(losses).item() == 2.0
    assert loop.finite_mean([torch.tensor(math.nan)] * 3).item() == 0.0  # every step skipped: 0, not NaN


def session_with(weight: torch.Tensor, average: torch.Tensor):
    ema = SimpleNamespace(state_dict=lambda: {"w": average, "steps": torch.tensor(3)})
    return SimpleNamespace(train_step=SimpleNamespace(params=[weight], ema=ema))


@pytest.mark.parametrize("bad", ["weights", "average"])
def test_non_finite_weights_are_refused_before_they_are_written(tmp_path, bad):
    finite, broken = torch.ones(4), torch.tensor([1.0, math.nan, 1.0, 1.0])
    loop.check_weights_finite(session_with(finite, finite), loop.RunLayout(tmp_path), step=10)  # finite: passes
    weight, average = (broken, finite) if bad == "weights" else (finite, broken)
    with pytest.raises(UserError, match="the weights became non-finite by step 10; no checkpoint was written"):
        loop.check_weights_finite(session_with(weight, average), loop.RunLayout(tmp_path), step=10)


def test_images_per_second_counts_warm_steps_over_their_time(monkeypatch):
    clock = iter([100.0, 102.0, 200.0, 300.0, 301.0])  # a step not counted reads no clock at its end
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    pace = loop.Throughput()
    pace.start(); pace.stop(64)                 # 64 images in 2 s
    pace.start(); pace.stop(1000, warm=False)   # a first (compiling) step: not counted
    pace.start(); pace.stop(32)                 # 32 images in 1 s
    assert pace.rate == pytest.approx(96 / 3)
