"""How a run executes on this machine: threads, determinism, torch.compile, memory format, and
the record a checkpoint keeps of them. The one place that turns `runtime.*` into torch settings:
`torch_settings` (threads and determinism, for a block), `cpu_threads` (threads alone),
`memory_format` and `compile_model`. Importing it changes nothing; only those calls do."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .config import RuntimeConfig
from .errors import ConfigError, UserError


def check_runtime(runtime: RuntimeConfig, device: torch.device) -> None:
    """A ConfigError unless these settings can run on `device` (before anything is written).
    The backend's own check runs where the norm layers are built (kernels.check_layer)."""
    check_cpu_threads(runtime.cpu_threads)  # on a GPU too: the same config must run on the CPU
    if runtime.compile == "reduce-overhead" and device.type != "cuda":
        raise ConfigError("runtime.compile=reduce-overhead captures CUDA graphs and needs a CUDA device; "
                          "use runtime.compile=default or none on the CPU.")
    if runtime.compile == "max-autotune" and runtime.deterministic:
        raise ConfigError("runtime.compile=max-autotune picks kernels by timing them, so resume is not bit-exact; "
                          "set runtime.deterministic=false to use it, or use runtime.compile=default.")


# cuBLAS reuses its workspace across streams unless told to keep one per configuration; torch's
# deterministic mode refuses CUDA matmuls without one of these two values.
CUBLAS_DETERMINISTIC = ":4096:8"
INDUCTOR_CACHE = Path.home() / ".cache" / "gn_diffusion" / "inductor"


def configure_torch(runtime: RuntimeConfig) -> None:
    """Apply runtime.* to this process until something changes it again (`torch_settings` puts
    everything back afterwards; prefer it). It changes, process-wide:

    - torch's CPU threads, to runtime.cpu_threads (0: left as they are);
    - deterministic=true: torch.use_deterministic_algorithms(True) (an op with no deterministic
      kernel raises instead of running), cudnn.deterministic on, cudnn.benchmark and TF32 off, and
      $CUBLAS_WORKSPACE_CONFIG (when unset), which cuBLAS reads at its first use, so this must
      run before the process's first CUDA matmul;
    - deterministic=false: the fast settings: cudnn.benchmark and TF32 (matmul and cudnn) on,
      deterministic algorithms off;
    - $TORCHINDUCTOR_CACHE_DIR, when unset, to ~/.cache/gn_diffusion/inductor, so compiled graphs
      persist across restarts and resumes (warm compiles).
    """
    set_cpu_threads(runtime.cpu_threads)
    exact = runtime.deterministic
    if exact:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    torch.use_deterministic_algorithms(exact)
    torch.backends.cudnn.deterministic = exact
    torch.backends.cudnn.benchmark = not exact
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))


_ENVIRONMENT = ("CUBLAS_WORKSPACE_CONFIG", "TORCHINDUCTOR_CACHE_DIR")  # the variables configure_torch may set
_FLAGS = ((torch.backends.cudnn, "deterministic"), (torch.backends.cudnn, "benchmark"),
          (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"))


@contextlib.contextmanager
def torch_settings(runtime: RuntimeConfig) -> Iterator[None]:
    """configure_torch(runtime) inside the block; afterwards, however the block ends, every setting
    it changes is as it was before, so a train() called from a notebook leaves the process as it
    found it."""
    threads = torch.get_num_threads()
    algorithms = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    flags = [getattr(owner, name) for owner, name in _FLAGS]
    environment = {key: os.environ.get(key) for key in _ENVIRONMENT}
    try:
        configure_torch(runtime)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
        for (owner, name), value in zip(_FLAGS, flags):
            setattr(owner, name, value)
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def memory_format(runtime: RuntimeConfig) -> torch.memory_format:
    return torch.channels_last if runtime.channels_last else torch.contiguous_format


def compile_model(model: torch.nn.Module, runtime: RuntimeConfig, compiler: Optional[str] = None) -> Callable:
    """The model's training forward (and, through AOTAutograd, its backward), compiled per
    runtime.compile; the model itself when it is none. `compiler` (torch.compile's backend)
    replaces Inductor: tests use "eager" to count graphs without paying for code generation."""
    if runtime.compile == "none":
        return model
    options = {"backend": compiler} if compiler else {"mode": runtime.compile}
    return torch.compile(model, **options)


def compile_failure(exc: BaseException) -> Optional[UserError]:
    """The sentence for a torch.compile failure (no C compiler, Triton missing, ...), or None
    when `exc` is not one."""
    from torch._dynamo.exc import TorchDynamoException

    if isinstance(exc, TorchDynamoException) or type(exc).__module__.startswith("torch._inductor"):
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return UserError(f"torch.compile failed here ({first}); set runtime.compile=none to train without it.")
    return None


def execution_record(runtime: RuntimeConfig, device: torch.device) -> dict[str, Any]:
    """What a checkpoint keeps of how it was made: a resume elsewhere is not bit-exact."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": device.type, "gpu": gpu, "compile": runtime.compile, "deterministic": runtime.deterministic}


def resume_note(saved: Optional[dict[str, Any]], now: dict[str, Any]) -> Optional[str]:
    """One line when a run resumes under other execution settings than it was saved with."""
    if saved is None or saved == now:
        return None
    changed = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k])
    return f"note: resuming with other execution settings ({changed}); the continuation is not bit-exact."


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
