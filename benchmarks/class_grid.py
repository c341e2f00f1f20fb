"""A class-conditional model's samples as a grid with one row per class, named at its left.

usage: python benchmarks/class_grid.py RUN_DIR OUT.png [PER_CLASS] [sample.KEY=VALUE ...]

The run's own sample settings (scheduler, steps, guidance, seed) apply, as in sample.py. Class
names are the run's class sub-folders (data.path, sorted as training indexed them), else numbers.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gn_diffusion.images import grid_array  # noqa: E402
from gn_diffusion.sample.command import sample_config  # noqa: E402
from gn_diffusion.sample.generate import generate  # noqa: E402
from gn_diffusion.sample.model_folder import load_model  # noqa: E402


def class_names(cfg) -> list[str]:
    folder = Path(cfg.data.path or "")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if cfg.data.path and folder.is_dir() else []
    return names if len(names) == cfg.model.num_classes else [str(i) for i in range(cfg.model.num_classes)]


def main(argv: list[str]) -> None:
    run, out = Path(argv[0]), Path(argv[1])
    per_class = int(argv[2]) if len(argv) > 2 and "=" not in argv[2] else 10
    overrides = [a for a in argv[2:] if "=" in a]
    cfg = sample_config(run, overrides)
    classes = cfg.model.num_classes
    labels = [c for c in range(classes) for _ in range(per_class)]  # class-major: a row per class
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, num_images=len(labels), class_labels=labels))
    model, _ = load_model(run, runtime=cfg.runtime)
    images, _ = generate(model, cfg)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = grid_array(images, per_class)
    fig, ax = plt.subplots(figsize=(per_class * 0.6 + 1.6, classes * 0.6 + 0.3))
    ax.imshow(grid.squeeze(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    cell = grid.shape[0] / classes
    ax.set_yticks([cell * (i + 0.5) for i in range(classes)], class_names(cfg), fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout(pad=0.2)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}: {classes} classes x {per_class} images, {cfg.sample.scheduler} "
          f"{cfg.sample.num_inference_steps} steps, guidance {cfg.sample.guidance_scale}")


if __name__ == "__main__":
    main(sys.argv[1:])
