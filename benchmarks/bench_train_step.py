"""A whole optimizer step (forward, backward, clipping, AdamW, EMA) of our GNUNet against
diffusers' UNet2DModel built to the same DDPM CIFAR-10 config, two ways, and the training loop's
overhead.

    python benchmarks/bench_train_step.py --quick          # CPU: the 10-minute grid, one thread
    python benchmarks/bench_train_step.py                  # CUDA: batch 2..128, every compile mode, both backends
    python benchmarks/bench_train_step.py --batches 128 --compiles none default --backends triton

Every cell of the grid (batch x compile mode x channels_last) builds its contenders fresh: ours on
the digits config and on configs/cifar10.yaml (our TrainStep, per backend), and UNet2DModel on the
CIFAR config twice: diffusers-cifar10 with a hand-written step equal to ours (the model
comparison: ours/diffusers), and diffusers-example-cifar10 trained as diffusers' example
train_unconditional.py trains it (global-RNG draws, default AdamW, accelerate's clipping and lr
scheduler, EMAModel, a loss.item() every step: the product comparison, ours/example). After
warm-up, blocks of steps run round-robin over the contenders (ours, ours, diffusers, example,
ours, ...), so a noisy machine slows all alike; ms/step is the median and each ratio the median
over the back-to-back pairs.
The second measurement pairs the real loop (start_session: data loading, EMA, clipping, the
loss window) with a bare forward + backward + AdamW on one pre-made batch. Results go to
results/train_step-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gn_diffusion.config import load_config  # noqa: E402
from train_step_parts import (TINY_DIGITS, example, interleaved, launches_per_step, loop_pair,  # noqa: E402
                              memory_mark, memory_used_since, ours, paired_ratio, sync, theirs)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"digits": ROOT / "configs/digits.yaml", "cifar10": ROOT / "configs/cifar10.yaml"}
LOOP_TARGET = 1.10  # whole loop / bare step, CPU, tiny digits, batch 2, one thread
# The diffusers contenders (CIFAR config, torch backend) and the ratio column each gives our CIFAR rows.
DIFFUSERS = {"diffusers-cifar10": (theirs, "ratio_vs_diffusers"),
             "diffusers-example-cifar10": (example, "ratio_vs_example")}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def contenders_of(args, device) -> list[tuple[str, str, str]]:
    """(name, config, backend) of every contender in a cell; the diffusers ones last (the model
    comparison, then the example), so each block of ours is followed by theirs."""
    contenders = [(f"ours-{config}-{backend}", config, backend) for backend in args.backends for config in args.configs]
    return contenders + [(name, "cifar10", "torch") for name in DIFFUSERS]


def cell_config(args, config: str, backend: str, batch: int, compile_mode: str, channels_last: bool):
    overrides = [f"train.batch_size={batch}", f"train.mixed_precision='{args.precision}'",
                 f"train.output_dir={tempfile.gettempdir()}/bench-train-step", f"runtime.backend={backend}",
                 f"runtime.compile={compile_mode}", f"runtime.channels_last={str(channels_last).lower()}",
                 f"runtime.cpu={str(args.device == 'cpu').lower()}", f"runtime.cpu_threads={args.threads}",
                 f"runtime.deterministic={str(args.deterministic).lower()}"]
    if config == "cifar10" and args.cifar_width:
        overrides.append(f"model.base_channels={args.cifar_width}")
    return load_config(CONFIGS[config], overrides)


def run_cell(args, device, batch: int, compile_mode: str, channels_last: bool) -> list[dict]:
    """Build, warm, then time every contender of one cell; one row each."""
    torch._dynamo.reset()  # a fresh, static-shape compile per cell, as a real run gets
    contenders, rows = [], []
    for name, config, backend in contenders_of(args, device):
        if compile_mode != "none" and any(name.startswith(s) for s in args.compile_skip):
            rows.append({"name": name, "skipped": "compile skipped (--compile-skip)"})
            continue
        cfg = cell_config(args, config, backend, batch, compile_mode, channels_last)
        mark = memory_mark(device)
        c = DIFFUSERS.get(name, (ours,))[0](name, config, cfg, batch)
        first = time.perf_counter()
        c.step(0)
        sync(device)
        first = time.perf_counter() - first
        for i in range(1, args.warmup):
            c.step(i)
        sync(device)
        contenders.append(c)
        rows.append({"name": name, "first_s": first, "memory_bytes": memory_used_since(mark, device)})
    times = interleaved(contenders, args.warmup, args.reps, args.block, device)
    after = args.warmup + args.reps * args.block
    by_name = {c.name: c for c in contenders}
    for row in rows:
        c = by_name.get(row["name"])
        if c is None:
            continue
        t = times[c.name]
        ms = statistics.median(t["wall_ms"])
        row.update(model=c.model, config=c.config, backend=c.backend, params=c.params, ms=ms,
                   images_per_s=batch * 1e3 / ms, host_ms=statistics.median(t["host_ms"]),
                   compile_s=row["first_s"] - ms / 1e3, launches=count_launches(c, after, device, compile_mode),
                   wall_ms=t["wall_ms"])
    for row in rows:
        row.update(batch=batch, compile=compile_mode, channels_last=channels_last)
        if "ms" in row and row["model"] == "GNUNet" and row["config"] == "cifar10":
            for name, (_, key) in DIFFUSERS.items():
                if name in times:
                    row[key] = paired_ratio(row["wall_ms"], times[name]["wall_ms"])
    return rows


def count_launches(c, step: int, device: torch.device, compile_mode: str) -> dict:
    """Launches of one step; none for compiled steps on the CPU: while a TorchDispatchMode is
    active, Dynamo runs the model's eager code, so the count would be eager's."""
    return launches_per_step(c, step, device) if device.type == "cuda" or compile_mode == "none" else {}


def loop_overhead(args) -> dict:
    """The whole loop against the bare step, interleaved; the target is <= LOOP_TARGET."""
    loop, bare, _ = loop_pair(args.threads or torch.get_num_threads(), args.precision)
    cpu = torch.device("cpu")
    for i in range(args.loop_warmup):
        loop.step(i), bare.step(i)
    times = interleaved([loop, bare], args.loop_warmup, args.loop_reps, args.loop_block, cpu)
    loop_ms, bare_ms = times["whole loop"]["wall_ms"], times["bare step"]["wall_ms"]
    ratio = paired_ratio(loop_ms, bare_ms)
    q1, _, q3 = statistics.quantiles([a / b for a, b in zip(loop_ms, bare_ms)], n=4)
    return {"model": "GNUNet digits, shrunk: " + ", ".join(o.split(".", 1)[1] for o in TINY_DIGITS),
            "batch": 2, "threads": torch.get_num_threads(), "params": loop.params,
            "loop_ms": statistics.median(loop_ms), "bare_ms": statistics.median(bare_ms),
            "loop_host_ms": statistics.median(times["whole loop"]["host_ms"]),
            "bare_host_ms": statistics.median(times["bare step"]["host_ms"]),
            "ratio": ratio, "ratio_quartiles": [q1, q3], "target": LOOP_TARGET, "met": ratio <= LOOP_TARGET,
            "steps": args.loop_reps * args.loop_block}


# ---------------------------------------------------------------------------------------------
# Report


def fmt_launches(launches: dict) -> str:
    return " / ".join(str(v) for v in launches.values()) or "-"


def fmt_memory(row: dict, device: torch.device) -> str:
    mib = row["memory_bytes"] / 2**20
    return f"{mib:.0f}" if device.type == "cuda" or mib > 0.5 else "-"


def markdown(record: dict, device: torch.device) -> str:
    what = "peak MiB" if device.type == "cuda" else "RSS +MiB"
    launches = "launch calls / kernels" if device.type == "cuda" else "aten ops"
    lines = [f"# Train step on {record['device']}", "",
             f"torch {record['torch']}, triton {record['triton']}, diffusers {record['diffusers']}, "
             f"{record['threads']} thread(s), precision {record['precision']}, "
             f"deterministic={record['deterministic']}. Command: `{record['command']}` ({record['wall_s']:.0f} s).",
             "", record["note"], "",
             f"| batch | compile | ch_last | contender | params | ms/step | img/s | ours/diffusers | ours/example "
             f"| {what} | compile s | {launches}/step | host ms/step |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        cell = f"| {r['batch']} | {r['compile']} | {'on' if r['channels_last'] else 'off'} | {r['name']} "
        if "skipped" in r:
            lines.append(cell + f"| | {r['skipped']} | | | | | | | |")
            continue
        ratios = " | ".join(f"{r[key]:.2f}x" if key in r else "-" for _, key in DIFFUSERS.values())
        compile_s = f"{r['compile_s']:.1f}" if r["compile"] != "none" else f"({r['compile_s']:.2f})"
        lines.append(cell + f"| {r['params'] / 1e6:.2f}M | {r['ms']:.1f} | {r['images_per_s']:.0f} | {ratios} "
                     f"| {fmt_memory(r, device)} | {compile_s} | {fmt_launches(r['launches'])} | {r['host_ms']:.1f} |")
    loop = record.get("loop_overhead")
    if loop:
        lines += ["", "## Loop overhead", "",
                  f"{loop['model']}; batch {loop['batch']}, {loop['threads']} thread(s), eager, "
                  f"{loop['params']} parameters, {loop['steps']} timed steps each.", "",
                  "| whole loop ms/step | bare step ms/step | loop host ms | bare host ms | loop / bare "
                  "| its quartiles over the pairs | target |",
                  "|---:|---:|---:|---:|---:|---:|---|",
                  f"| {loop['loop_ms']:.2f} | {loop['bare_ms']:.2f} | {loop['loop_host_ms']:.2f} | "
                  f"{loop['bare_host_ms']:.2f} | {loop['ratio']:.3f}x | {loop['ratio_quartiles'][0]:.3f}-"
                  f"{loop['ratio_quartiles'][1]:.3f}x | <= {loop['target']:.2f}x: "
                  f"{'met' if loop['met'] else 'NOT met'} |"]
    return "\n".join(lines) + "\n"


def note(args, device) -> str:
    width = (f"The CIFAR rows use the DDPM CIFAR-10 topology at base {args.cifar_width} channels (full width: "
             f"base 128) for both models" if args.cifar_width else "The CIFAR rows use configs/cifar10.yaml as is")
    return (f"{width}. Compile s is the first step minus the steady step (in brackets for eager: first-step "
            "set-up). Memory: " + ("peak allocation above what was allocated before the contender was built."
                                   if device.type == "cuda" else "resident-set growth from building the "
                                   "contender to the end of its warm-up ('-': none).")
            + f" {args.warmup} warm-up steps, {args.reps} interleaved blocks of {args.block} step(s)."
            + f" Compiled cells (cold Inductor cache unless --inductor-cache): batch:channels_last "
              f"{' '.join(args.compile_at)}" + (f", without {' '.join(args.compile_skip)}" if args.compile_skip else "")
            + ". ours/diffusers compares models: ours-cifar10 against UNet2DModel under a step equal to ours "
              "(diffusers-cifar10). ours/example compares products: ours-cifar10 against UNet2DModel trained as "
              "diffusers' train_unconditional.py trains it (diffusers-example-cifar10: global-RNG draws, default "
              "AdamW, accelerate's clipping and lr scheduler, EMAModel, loss.item() every step; the cell's compile "
              "mode and layout applied, so eager/off is the example as shipped). Each ratio is the median of "
              "per-pair ratios, so it can differ from the ratio of the medians.")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="CPU grid in under 10 minutes (see README)")
    p.add_argument("--batches", type=int, nargs="+", help="per-device batch (CUDA: 2 8 32 128; CPU: 2 8)")
    p.add_argument("--compiles", nargs="+", choices=["none", "default", "max-autotune", "reduce-overhead"])
    p.add_argument("--backends", nargs="+", choices=["torch", "triton"], help="ours (CUDA: both; CPU: torch)")
    p.add_argument("--channels-last", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="our configs")
    p.add_argument("--cifar-width", type=int, help="base channels of both CIFAR models (default: config's; quick: 32)")
    p.add_argument("--compile-skip", nargs="*", help="contender name prefixes to leave out of compile cells")
    p.add_argument("--compile-at", nargs="*", help="BATCH:off|on cells that compile (default all; quick: 2:off)")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], help="(CUDA: bf16, the CIFAR config's; CPU: no)")
    p.add_argument("--deterministic", action="store_true", help="keep runtime.deterministic (no cudnn.benchmark/TF32)")
    p.add_argument("--threads", type=int, help="torch CPU threads; 0: torch's default (quick: 1)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (the first is the compile step)")
    p.add_argument("--reps", type=int, help="interleaved blocks per contender (CUDA 20, CPU 7)")
    p.add_argument("--block", type=int, help="steps per timed block (CUDA 10, CPU 1)")
    p.add_argument("--loop-reps", type=int, default=60)
    p.add_argument("--loop-block", type=int, default=10)
    p.add_argument("--loop-warmup", type=int, default=20)
    p.add_argument("--no-loop", action="store_true", help="skip the loop-overhead measurement")
    p.add_argument("--inductor-cache", help="TORCHINDUCTOR_CACHE_DIR (default: a fresh one, so compiles are cold)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = p.parse_args(argv)
    on_cuda = a.device == "cuda"
    if on_cuda and not cuda:
        p.error("no CUDA device here; use --device cpu (or --quick)")
    if a.quick and on_cuda:
        p.error("--quick is the CPU grid; drop --device cuda")
    quick = dict(batches=[2, 8], compiles=["none", "default"], threads=1, cifar_width=32,
                 compile_skip=["ours-cifar10", "diffusers"], compile_at=["2:off"]) if a.quick else {}
    defaults = dict(batches=[2, 8, 32, 128] if on_cuda else [2, 8],
                    compiles=["none", "default", "max-autotune", "reduce-overhead"] if on_cuda else ["none", "default"],
                    backends=["torch", "triton"] if on_cuda else ["torch"], precision="bf16" if on_cuda else "no",
                    threads=0, reps=20 if on_cuda else 7, block=10 if on_cuda else 1, compile_skip=[],
                    compile_at=[f"{b}:{cl}" for b in a.batches or [2, 8, 32, 128] for cl in ("off", "on")])
    for key, value in {**defaults, **quick}.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if not on_cuda and ({"triton"} & set(a.backends) or "reduce-overhead" in a.compiles):
        p.error("the Triton backend and compile=reduce-overhead need CUDA")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or tempfile.mkdtemp(prefix="bench-inductor-")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for batch in args.batches:
        for compile_mode in args.compiles:
            for cl in args.channels_last:
                if compile_mode != "none" and f"{batch}:{cl}" not in args.compile_at:
                    continue  # --compile-at: each cold compile costs minutes on a CPU
                cell = run_cell(args, device, batch, compile_mode, cl == "on")
                for r in cell:
                    ratios = "".join(f", ours/{key.removeprefix('ratio_vs_')} {r[key]:.2f}x"
                                     for _, key in DIFFUSERS.values() if key in r)
                    print(f"batch {batch} {compile_mode} channels_last={cl} {r['name']}: "
                          + (r["skipped"] if "skipped" in r else f"{r['ms']:.1f} ms/step{ratios}"), flush=True)
                rows += cell
    loop = None if args.no_loop else loop_overhead(args)
    if loop:
        print(f"loop overhead: {loop['loop_ms']:.2f} / {loop['bare_ms']:.2f} ms = {loop['ratio']:.3f}x", flush=True)
    import diffusers
    import triton
    record = {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
              "diffusers": diffusers.__version__, "threads": torch.get_num_threads(), "precision": args.precision,
              "deterministic": args.deterministic, "command": " ".join(["python", *sys.argv]),
              "wall_s": time.perf_counter() - began, "note": note(args, device),
              "rows": rows, "loop_overhead": loop}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"train_step-{slug(device_name(device)) if device.type == 'cuda' else 'cpu'}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    table = markdown(record, device)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
