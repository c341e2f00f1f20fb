"""runtime.* is applied for the length of a command and put back after it: threads, torch's
deterministic mode, cudnn's and TF32's flags and the environment variables it sets."""

import os
import subprocess
import sys

import pytest
import torch

import gn_diffusion.sample.command as sample_command
import gn_diffusion.train.loop as loop
from gn_diffusion.errors import UserError
from gn_diffusion.runtime import configure_torch, torch_settings
from gn_diffusion.config import RuntimeConfig
from gn_diffusion.train.loop import train

from conftest import ROOT, tiny_config

SHORT = ["train.max_steps=1", "train.checkpoint_every=1"]


def settings() -> dict:
    cudnn = torch.backends.cudnn
    return {"threads": torch.get_num_threads(), "algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn.deterministic": cudnn.deterministic, "cudnn.benchmark": cudnn.benchmark,
            "matmul.tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn.tf32": cudnn.allow_tf32,
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "inductor": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


@pytest.fixture
def outside(monkeypatch):
    """Settings unlike any a run makes (two threads, deterministic mode in warn-only form, every
    flag the other way round), put back after the test whatever happens."""
    before = settings(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # then deleted: monkeypatch restores only what it saw
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    torch.set_num_threads(2)
    yield
    old, warn_only = before
    torch.set_num_threads(old["threads"])
    torch.use_deterministic_algorithms(old["algorithms"], warn_only=warn_only)
    for name, attr in (("cudnn.deterministic", "deterministic"), ("cudnn.benchmark", "benchmark"),
                       ("cudnn.tf32", "allow_tf32")):
        setattr(torch.backends.cudnn, attr, old[name])
    torch.backends.cuda.matmul.allow_tf32 = old["matmul.tf32"]


def set_opposite(deterministic: bool) -> None:
    torch.use_deterministic_algorithms(not deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = not deterministic
    torch.backends.cudnn.benchmark = deterministic
    torch.backends.cuda.matmul.allow_tf32 = deterministic
    torch.backends.cudnn.allow_tf32 = deterministic


def seen_during_the_run(monkeypatch) -> list[dict]:
    """The settings as the run's export sees them, one entry per export."""
    seen, export = [], loop.export_model
    monkeypatch.setattr(loop, "export_model", lambda *a, **k: seen.append(settings()) or export(*a, **k))
    return seen


@pytest.mark.parametrize("deterministic", [True, False])
def test_train_applies_runtime_settings_during_the_run_and_restores_them(tmp_path, monkeypatch, outside,
                                                                         deterministic):
    set_opposite(deterministic)
    before, warn_only = settings(), torch.is_deterministic_algorithms_warn_only_enabled()
    seen = seen_during_the_run(monkeypatch)
    train(tiny_config(tmp_path, *SHORT, "runtime.cpu_threads=1", f"runtime.deterministic={str(deterministic).lower()}"),
          progress=False)
    assert seen == [{"threads": 1, "algorithms": deterministic, "cudnn.deterministic": deterministic,
                     "cudnn.benchmark": not deterministic, "matmul.tf32": not deterministic,
                     "cudnn.tf32": not deterministic, "cublas": ":4096:8" if deterministic else None,
                     "inductor": "/elsewhere"}]  # a cache the user chose is kept
    assert settings() == before and before["threads"] == 2
    assert torch.is_deterministic_algorithms_warn_only_enabled() == warn_only


def test_train_with_torch_s_threads_leaves_them_and_a_failed_run_restores_its_own(tmp_path, monkeypatch, outside):
    seen = seen_during_the_run(monkeypatch)
    train(tiny_config(tmp_path / "a", *SHORT), progress=False)  # the digits config: runtime.cpu_threads=0
    assert seen[0]["threads"] == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with pytest.raises(UserError, match="fewer than one batch"):  # after the settings were applied
        train(tiny_config(tmp_path / "b", *SHORT, "runtime.cpu_threads=1", "runtime.deterministic=true",
                          "train.batch_size=2000"), progress=False)
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_torch_settings_sets_the_inductor_cache_only_when_unset(monkeypatch, outside):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with torch_settings(RuntimeConfig()):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith(os.path.join("gn_diffusion", "inductor"))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_sample_py_restores_the_thread_count(run_dir, monkeypatch, outside):
    seen, generate = [], sample_command.generate
    monkeypatch.setattr(sample_command, "generate", lambda *a, **k: seen.append(torch.get_num_threads()) or generate(*a, **k))
    sample_command.sample_main(str(run_dir), ["runtime.cpu_threads=1", f"sample.output_dir={run_dir / 'gen'}"])
    assert seen == [1] and torch.get_num_threads() == 2


def test_importing_the_package_changes_no_torch_setting():
    """Only configure_torch and torch_settings change process-wide state; importing changes nothing."""
    code = ("import os, torch\n"
            "def now(): return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), "
            "torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32, "
            "torch.backends.cudnn.allow_tf32, {k: v for k, v in os.environ.items() if k.startswith(('CUBLAS', 'TORCH'))})\n"
            "before = now()\n"
            "import gn_diffusion.runtime, gn_diffusion.train.loop, gn_diffusion.sample.command, gn_diffusion.evaluate.command\n"
            "print(now() == before)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "True", done.stdout + done.stderr


def test_configure_torch_sets_and_keeps_its_settings(outside):
    configure_torch(RuntimeConfig(deterministic=True, cpu_threads=1))
    assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
