"""Fused GroupNorm + AdaGN + SiLU (Triton) against eager PyTorch and torch.compile of the same.

    python benchmarks/bench_group_norm.py                  # CUDA: every shape, bf16 and fp32, both layouts
    python benchmarks/bench_group_norm.py --shapes 2,320,64,64 --dtypes bf16
    TRITON_INTERPRET=1 python benchmarks/bench_group_norm.py --device cpu --shapes 1,8,4,4 --groups 2 --out /tmp/gn

For each case it times forward, backward and forward+backward (median of per-call device-event
timings after a warm-up, rotating over enough input sets that they do not fit in L2), reports
microseconds, the bandwidth achieved on the minimal traffic (forward reads x and writes y:
2 x numel x bytes; backward reads x and dy and writes dx: 3 x numel x bytes) and its fraction of
a device-to-device copy measured in the same run. It writes results/<gpu>-group_norm.json and a
markdown table beside it. `--device cpu` only checks the plumbing (interpreted kernels, host
clock): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gn_diffusion.kernels import require_triton  # noqa: E402
from gn_diffusion.kernels.function import GroupNormSiLUFunction  # noqa: E402

SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8),
          (128, 128, 32, 32), (128, 256, 16, 16), (128, 256, 8, 8)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
PASSES = ("forward", "backward", "forward+backward")
TRAFFIC = {"forward": 2, "backward": 3, "forward+backward": 5}  # x numel x bytes
EPS = 1e-5


@dataclass
class Row:
    shape: tuple[int, ...]
    groups: int
    dtype: str
    layout: str
    variant: str
    phase: str
    median_us: float
    gb_per_s: float
    fraction_of_copy: float


# ---------------------------------------------------------------------------------------------
# The three implementations of y = silu(GN(x) * (1 + scale) + shift)


def eager(x, weight, bias, scale, shift, groups):
    h = F.group_norm(x, groups, weight, bias, EPS)
    return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def fused(x, weight, bias, scale, shift, groups):
    return GroupNormSiLUFunction.apply(x, weight, bias, scale, shift, groups, EPS, True)  # the eager path


def variants() -> dict[str, Callable]:
    return {"fused": fused, "eager": eager, "compile": torch.compile(eager, dynamic=False)}


# ---------------------------------------------------------------------------------------------
# Timing


def clock(device: torch.device):
    """start() -> handle, stop(handle) -> mark, seconds(marks) -> device seconds of each mark
    (CUDA events; the host clock on the CPU)."""
    if device.type == "cuda":
        def start():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            return begin, end

        def stop(handle):
            handle[1].record()
            return handle

        def seconds(marks):
            torch.cuda.synchronize()
            return [begin.elapsed_time(end) / 1e3 for begin, end in marks]

        return start, stop, seconds
    return time.perf_counter, lambda began: time.perf_counter() - began, list


def median_seconds(run: Callable, sets: int, device: torch.device, budget_s: float, min_reps: int = 20,
                   prepare: Callable[[int], object] = lambda i: i, warmup: int = 5, max_reps: int = 2000) -> float:
    """Median over per-call timings of run(prepare(i)), cycling i over the input sets; prepare
    runs outside the timed region."""
    start, stop, seconds = clock(device)
    for i in range(max(warmup, 1)):
        run(prepare(i % sets))
    if device.type == "cuda":
        torch.cuda.synchronize()
    marks, began = [], time.perf_counter()
    while len(marks) < max_reps and (len(marks) < min_reps or time.perf_counter() - began < budget_s):
        arg = prepare(len(marks) % sets)
        handle = start()
        run(arg)
        marks.append(stop(handle))
    return statistics.median(seconds(marks))


def copy_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.randn(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda i: dst.copy_(src), 1, device, budget_s=1.0)
    return 2 * src.numel() * src.element_size() / seconds


# ---------------------------------------------------------------------------------------------
# One case: shape x dtype x layout


def input_sets(shape, dtype, memory_format, device, count, seed=0):
    """`count` independent sets of (x, weight, bias, scale, shift, dy), all requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, c = shape[:2]

    def rand(*size, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(size, generator=gen, device=device)).to(dtype)

    sets = []
    for _ in range(count):
        x = rand(*shape).contiguous(memory_format=memory_format)
        dy = rand(*shape).contiguous(memory_format=memory_format)
        params = [rand(c, offset=1.0, scale=0.5), rand(c, scale=0.5), rand(n, c, scale=0.3), rand(n, c, scale=0.5)]
        sets.append(([t.requires_grad_() for t in (x, *params)], dy))
    return sets


def sets_to_defeat_cache(shape, dtype, device) -> int:
    if device.type != "cuda":
        return 2
    per_set = 2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(512, math.ceil(4 * l2 / per_set)))


def check_against_float64(fn, sets, groups) -> dict[str, float]:
    """Relative error max|a - b| / max|b| of y and dx against eager PyTorch in float64."""
    inputs, dy = sets[0]
    y = fn(*inputs, groups)
    dx = torch.autograd.grad(y, inputs[0], dy)[0]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_y = eager(*ref_inputs, groups)
    ref_dx = torch.autograd.grad(ref_y, ref_inputs[0], dy.double())[0]
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return {"y": rel(y, ref_y), "dx": rel(dx, ref_dx)}


def time_case(fn, sets, groups, device, budget_s, min_reps) -> dict[str, float]:
    def forward(i):
        inputs, _ = sets[i]
        return fn(*inputs, groups), i

    def backward(graph):
        y, i = graph
        inputs, dy = sets[i]
        torch.autograd.grad(y, inputs, dy)

    def forward_backward(i):
        backward(forward(i))

    timed = {"forward": (forward, lambda i: i), "backward": (backward, forward),
             "forward+backward": (forward_backward, lambda i: i)}
    return {phase: median_seconds(run, len(sets), device, budget_s, min_reps, prepare)
            for phase, (run, prepare) in timed.items()}


def run_case(shape, groups, dtype_name, layout, device, copy_bytes_per_s, budget_s, min_reps):
    dtype = DTYPES[dtype_name]
    sets = input_sets(shape, dtype, LAYOUTS[layout], device, sets_to_defeat_cache(shape, dtype, device))
    torch._dynamo.reset()  # a fresh compile per case: the recompile limit would send later cases to eager
    rows, errors = [], {}
    numel_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    for name, fn in variants().items():
        errors[name] = check_against_float64(fn, sets, groups)
        for phase, seconds in time_case(fn, sets, groups, device, budget_s, min_reps).items():
            rate = TRAFFIC[phase] * numel_bytes / seconds
            rows.append(Row(tuple(shape), groups, dtype_name, layout, name, phase, seconds * 1e6, rate / 1e9,
                            rate / copy_bytes_per_s))
    return rows, errors


# ---------------------------------------------------------------------------------------------
# Report


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown(rows: list[Row], copy_gb_per_s: float, title: str) -> str:
    lines = [f"# {title}", "",
             f"Device-to-device copy: {copy_gb_per_s:.0f} GB/s (read + write). Times are medians in "
             "microseconds; GB/s and % of copy are for the fused kernel on the minimal traffic.", "",
             "| shape | dtype | layout | pass | fused us | eager us | compile us | vs eager | vs compile "
             "| fused GB/s | % of copy |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    table = {(r.shape, r.dtype, r.layout, r.phase, r.variant): r for r in rows}
    for shape, dtype, layout, phase in dict.fromkeys((r.shape, r.dtype, r.layout, r.phase) for r in rows):
        f, e, c = (table[(shape, dtype, layout, phase, v)] for v in ("fused", "eager", "compile"))
        lines.append(
            f"| {'x'.join(map(str, shape))} | {dtype} | {layout} | {phase} | {f.median_us:.1f} | {e.median_us:.1f} "
            f"| {c.median_us:.1f} | {e.median_us / f.median_us:.2f}x | {c.median_us / f.median_us:.2f}x "
            f"| {f.gb_per_s:.0f} | {100 * f.fraction_of_copy:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--shapes", nargs="+", default=None, help="N,C,H,W ... (default: the issue's seven)")
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--seconds", type=float, default=0.3, help="timing budget per measurement")
    parser.add_argument("--min-reps", type=int, default=20, help="timed calls per measurement, at least")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    bad = [s for s in args.shapes if len(s) != 4 or s[1] % args.groups]
    if bad:
        parser.error(f"shapes {bad} are not N,C,H,W with C divisible by --groups {args.groups}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; this benchmark needs one (or --device cpu with TRITON_INTERPRET=1 "
                 "to check the script).")
    require_triton(device)
    copy = copy_bandwidth(device, 1024 if device.type == "cuda" else 64)
    print(f"device-to-device copy: {copy / 1e9:.0f} GB/s")
    rows, errors = [], {}
    cases = [(s, d, lay) for s in args.shapes for d in args.dtypes for lay in args.layouts]
    for shape, dtype, layout in cases:
        case_rows, case_errors = run_case(shape, args.groups, dtype, layout, device, copy, args.seconds,
                                          args.min_reps)
        rows += case_rows
        errors[f"{'x'.join(map(str, shape))}/{dtype}/{layout}"] = case_errors
        fused_times = {r.phase: r.median_us for r in case_rows if r.variant == "fused"}
        print(f"{shape} {dtype} {layout}: fused " + ", ".join(f"{p} {t:.1f} us" for p, t in fused_times.items())
              + f"; error vs float64 {case_errors['fused']}")
    slug = device_slug(device)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": __import__("triton").__version__, "groups": args.groups,
        "copy_gb_per_s": copy / 1e9, "traffic_numel_bytes": TRAFFIC,
        "relative_error_vs_float64": errors, "rows": [asdict(r) for r in rows],
    }
    (args.out / f"{slug}-group_norm.json").write_text(json.dumps(record, indent=1))
    table = markdown(rows, copy / 1e9, f"group_norm_silu on {record['device']}")
    (args.out / f"{slug}-group_norm.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
