"""Host cost of one GroupNorm32 forward+backward: the Python around the kernels, in microseconds.

    python benchmarks/bench_norm_host.py                 # CUDA if present, else the CPU with launches stubbed
    python benchmarks/bench_norm_host.py --device cpu --reps 3000

On small training batches the GPU finishes a norm's kernels long before Python has issued the
next ones, so the step time is the host time. This measures it three ways, each a forward with
AdaGN and SiLU plus a backward into x, weight, bias, scale and shift:

- **layer**: `GroupNorm32(backend="triton")` in eager mode (the `autograd.Function` path);
- **custom op**: the `gn_diffusion::group_norm_silu` op that torch.compile traces, called eagerly;
- **torch**: `GroupNorm32(backend="torch")`, the PyTorch path (its own ops, no Triton);
- **floor**: an autograd.Function with the same inputs that only allocates its output and
  gradients: what autograd itself costs per call, which no norm implementation can go below.

On the CPU every Triton kernel's launch is replaced by a no-op (under TRITON_INTERPRET=1), so
only host Python is timed; the torch path still computes, on a shape small enough that its
time is dispatch. On CUDA the kernels run for real on a small shape, so the wall clock of a
stream of calls is still the host's. Results go to results/norm_host_us-<device>.json and .md.

Each path is timed twice: alone (one norm, then its own backward) and in a chain of --chain norms
under one backward. A training step is the chain: the autograd engine's start-up is paid once
per step, not once per norm, so the chained figure is the host cost a norm adds to a step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gn_diffusion.kernels import triton_impl  # noqa: E402
from gn_diffusion.kernels.ops import group_norm_silu_op  # noqa: E402
from gn_diffusion.model.norms import GroupNorm32  # noqa: E402


@contextlib.contextmanager
def launches_stubbed():
    """Every `*_kernel` of the kernel module launches nothing while inside."""

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    module = triton_impl.kernels()
    saved = {name: getattr(module, name) for name in dir(module) if name.endswith("_kernel")}
    for name in saved:
        setattr(module, name, NoLaunch())
    try:
        yield
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def inputs(shape, groups, device):
    n, c = shape[:2]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    emb = torch.randn(n, 2 * c, generator=gen).to(device).requires_grad_()  # as a ResBlock's embedding
    dy = torch.randn(shape, generator=gen).to(device)
    layers = {backend: GroupNorm32(groups, c, backend=backend).to(device) for backend in ("triton", "torch")}
    return x, emb, dy, layers


class NoOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift):
        ctx.save_for_backward(x, weight, bias, scale, shift)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def variants(x, emb, dy, layers, chain: int) -> dict[str, Callable[[], None]]:
    """Per path, one call: `chain` norms applied in turn (each to the last one's output, with the
    same scale and shift), then one backward through all of them into x, emb and the parameters."""
    leaves = {backend: [x, emb, *layer.parameters()] for backend, layer in layers.items()}
    norm = layers["triton"]

    def through(apply, backend="triton"):
        def step():
            scale, shift = emb.chunk(2, dim=1)
            h = x
            for _ in range(chain):
                h = apply(h, scale, shift)
            torch.autograd.grad(h, leaves[backend], dy)
        return step

    def layer(backend):
        return through(lambda h, scale, shift: layers[backend](h, scale, shift, act=True), backend)

    def custom_op(h, scale, shift):
        return group_norm_silu_op(h, norm.weight, norm.bias, scale, shift, norm.num_groups, norm.eps, True, True)[0]

    return {"layer (autograd.Function)": layer("triton"), "custom op": through(custom_op),
            "torch": layer("torch"),
            "floor (no-op autograd.Function)": through(lambda h, scale, shift: NoOp.apply(h, norm.weight, norm.bias,
                                                                                         scale, shift))}


def host_us(steps: dict[str, Callable[[], None]], reps: int, device: torch.device, per_call: int = 1,
            batch: int = 50):
    """Per path, the median and the minimum over batches of `batch` back-to-back calls (`reps` in
    all) of the wall time per norm (a call runs `per_call` norms). Batches of the paths alternate, so a load change
    on a shared machine hits all paths alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(20):
            step()
    sync()
    per_norm = {name: [] for name in steps}
    for _ in range(max(1, reps // batch)):
        for name, step in steps.items():
            began = time.perf_counter()
            for _ in range(batch):
                step()
            sync()
            per_norm[name].append((time.perf_counter() - began) / (batch * per_call) * 1e6)
    return {name: statistics.median(t) for name, t in per_norm.items()}, {name: min(t) for name, t in per_norm.items()}


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") \
        if device.type == "cuda" else "cpu"


def markdown(record: dict) -> str:
    stub = " (kernel launches stubbed)" if record["launches_stubbed"] else ""
    chain = record["chain"]
    lines = [f"# Host microseconds per norm forward+backward on {record['device']}{stub}", "",
             f"Shape {record['shape']}, {record['groups']} groups, AdaGN + SiLU, gradients of x, weight, bias, "
             f"scale and shift; {record['reps']} norms per path and column, in batches of about 50 alternating "
             f"between paths. Alone: each call is one norm and its own backward. In a chain: {chain} norms, each fed the "
             "last one's output, then one backward through all of them, as in a training step (the autograd "
             "engine starts once per step, not once per norm); the figure is per norm.", "",
             "| path | alone: median us | alone: best batch | in a chain: median us | in a chain: best batch |",
             "|---|---:|---:|---:|---:|"]
    for name, us in record["host_us"].items():
        lines.append(f"| {name} | {us:.1f} | {record['host_us_min'][name]:.1f} | {record['chained_host_us'][name]:.1f} "
                     f"| {record['chained_host_us_min'][name]:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="2,64,8,8", help="N,C,H,W")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--chain", type=int, default=20, help="norms per backward in the chained measurement")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.shape = tuple(int(v) for v in args.shape.split(","))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    stubbed = device.type == "cpu"
    if stubbed:
        os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors take the Triton path; nothing is interpreted
    torch.set_num_threads(1)
    tensors = inputs(args.shape, args.groups, device)
    with launches_stubbed() if stubbed else contextlib.nullcontext():
        median, best = host_us(variants(*tensors, chain=1), args.reps, device)
        chained, chained_best = host_us(variants(*tensors, chain=args.chain), max(1, args.reps // args.chain),
                                        device, per_call=args.chain, batch=max(1, 50 // args.chain))
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"cpu ({platform.machine()}, {platform.python_implementation()} {platform.python_version()})",
              "launches_stubbed": stubbed, "shape": list(args.shape), "groups": args.groups, "reps": args.reps,
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "host_us": median, "host_us_min": best, "chain": args.chain,
              "chained_host_us": chained, "chained_host_us_min": chained_best}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"norm_host_us-{device_slug(device)}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    table = markdown(record)
    stem.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
