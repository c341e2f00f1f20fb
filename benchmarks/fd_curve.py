"""Frechet distance against training images seen: one point per checkpoint of a run.

usage: python benchmarks/fd_curve.py RUN_DIR OUT_DIR [eval.KEY=VALUE sample.KEY=VALUE ...]

Each checkpoint's EMA weights (checkpoints/step-N/ema.safetensors, checked before loading, as
every weights file is) are sampled and scored exactly as `python -m gn_diffusion.evaluate RUN_DIR`
scores the exported model: the run's eval and sample settings, the same extractor and floor.
Writes OUT_DIR/fd_curve.csv (one row per checkpoint) and OUT_DIR/fd_curve.png (FD and its floor,
and the accuracy on the requested class for a class-conditional model).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gn_diffusion.config import load_saved_config  # noqa: E402
from gn_diffusion.evaluate.command import evaluation_config  # noqa: E402
from gn_diffusion.evaluate.metric import evaluator_for  # noqa: E402
from gn_diffusion.model.unet import build_unet  # noqa: E402
from gn_diffusion.run_folder.checkpoint import scan_checkpoints  # noqa: E402
from gn_diffusion.run_folder.layout import EMA_FILE, RunLayout  # noqa: E402
from gn_diffusion.run_folder.weights import load_weights  # noqa: E402
from gn_diffusion.runtime import cpu_threads  # noqa: E402
from gn_diffusion.sample.generate import every_class_once, generate  # noqa: E402

COLUMNS = ["step", "images_seen", "fd", "floor", "ratio", "accuracy", "seconds"]


def score_checkpoints(run: Path, overrides: list[str]) -> list[dict]:
    cfg = evaluation_config(load_saved_config(RunLayout(run).config), overrides)
    rows = []
    with cpu_threads(cfg.runtime.cpu_threads):
        evaluator = evaluator_for(cfg)
        for step, folder in scan_checkpoints(run)[0]:
            start = time.time()
            model = build_unet(cfg.model, cfg.runtime)
            load_weights(model, folder / EMA_FILE)
            images, labels = generate(model.eval(), every_class_once(cfg, cfg.eval.num_images))
            report = evaluator.report(images, labels, made_by=f"the checkpoint {folder}")
            rows.append({"step": step, "images_seen": step * cfg.train.images_per_step(1),
                         "fd": report.samples.frechet, "floor": report.floor.frechet, "ratio": report.frechet_ratio,
                         "accuracy": report.samples.accuracy, "seconds": round(time.time() - start)})
            print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [r["images_seen"] / 1000 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(seen, [r["fd"] for r in rows], "o-", label="samples")
    ax.plot(seen, [r["floor"] for r in rows], "--", color="grey", label="floor (real training images)")
    ax.set_xlabel("training images seen (thousands)")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.set_yscale("log")
    ax.set_title(title)
    lines = ax.get_lines()
    if rows[0]["accuracy"] is not None:
        acc = ax.twinx()
        lines += acc.plot(seen, [100 * r["accuracy"] for r in rows], "s:", color="tab:green",
                          label="accuracy on requested class (right)")
        acc.set_ylabel("accuracy on requested class (%)")
        acc.set_ylim(0, 100)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    run, out, overrides = Path(argv[0]), Path(argv[1]), argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    rows = score_checkpoints(run, overrides)
    with open(out / "fd_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "fd_curve.png", f"{run.name}: FD per checkpoint")
    print(f"wrote {out / 'fd_curve.csv'} and {out / 'fd_curve.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
