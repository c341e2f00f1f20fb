"""Run the normalization ablation: norm kinds x per-device batch sizes, same images seen per cell.

usage: python -m gn_diffusion.ablate CONFIG.yaml [key=value ...]

CONFIG.yaml (e.g. configs/ablation_norms.yaml) has the sections output_dir, base (a training
config: model, diffusion, data, train, sample; base.runtime says how the cells run here, e.g.
base.runtime.cpu_threads=1), grid (norms, batch_sizes, images_seen, reference_batch_size,
lr_scaling), eval (num_samples, ...: every cell's evaluation) and loss_triples; overrides such as
grid.batch_sizes=[2,32] or output_dir=runs/mine change them. The run folder gets results.csv,
results.md and results.png; run the same command again to resume an interrupted sweep.
"""

from __future__ import annotations

import shlex

from .cli import run_cli, split_args
from .errors import UserError


def main(argv: list[str]) -> None:
    path, overrides = split_args(argv, default_config=None)
    if path is None:
        raise UserError("name the ablation config: python -m gn_diffusion.ablate configs/ablation_norms.yaml.")
    from .ablation_grid import load_ablation_config
    from .ablation_sweep import run_ablation

    command = " ".join(["python -m gn_diffusion.ablate", *map(shlex.quote, argv)])
    out = run_ablation(load_ablation_config(path, overrides), command=command)
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.png'}")


main.__doc__ = __doc__  # --help prints the module's usage

if __name__ == "__main__":
    run_cli(main)
