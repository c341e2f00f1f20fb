"""Run the normalization ablation: training seeds x norm kinds (group norm's grouping too, where
grid.groups or grid.channels_per_group lists it) x per-device batch sizes, the same images seen in
every cell.

usage: python -m gn_diffusion.ablation CONFIG.yaml [key=value ...] [--report-only [FOLDER]]

CONFIG.yaml (e.g. configs/ablation_norms.yaml) has the sections output_dir, base (a training
config: model, diffusion, data, train, sample; base.runtime says how the cells run here, e.g.
base.runtime.cpu_threads=1), grid (norms, groups, channels_per_group, batch_sizes, seeds,
images_seen, base_batch_size, lr_scaling), eval (num_images, ...: every cell's evaluation) and
loss_triples; overrides such as grid.batch_sizes=[2,32] or output_dir=runs/mine change them.
The run folder gets results.csv (every cell, with the git commit that made it), results.md,
summary.csv (mean and std over seeds) and results.png; run the same command again to resume an
interrupted sweep, or in a second terminal to train two cells side by side.

--report-only rebuilds results.md, summary.csv and results.png from FOLDER/results.csv
(default: output_dir) without training anything, e.g. the committed tables:
  python -m gn_diffusion.ablation configs/ablation_norms.yaml --report-only docs/ablation/norms
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

from ..cli import split_args
from ..errors import UserError

REPORT_ONLY = "--report-only"


def ablation_settings(args: list[str]) -> str:
    """--help's table of the ablation config's keys (defaults only: the config named is not read)."""
    from ..typed import settings_help
    from .grid import AblationConfig

    return settings_help(AblationConfig)


def main(argv: list[str]) -> None:
    sweep_argv, report_only, folder = take_report_only(argv)
    path, overrides = split_args(sweep_argv, default_config=None)
    if path is None:
        raise UserError("name the ablation config: python -m gn_diffusion.ablation configs/ablation_norms.yaml.")
    from .grid import load_ablation_config
    from .report import rebuild_report
    from .sweep import run_ablation

    # The command that makes the results, quoted in results.md: the same with --report-only.
    command = " ".join(["python -m gn_diffusion.ablation", *map(shlex.quote, sweep_argv)])
    ab = load_ablation_config(path, overrides)
    if report_only:
        out = Path(folder or ab.output_dir)
        rows = rebuild_report(out, ab, command)
        print(f"rebuilt from {len(rows)} results in {out / 'results.csv'}: "
              f"{out / 'results.md'}, {out / 'summary.csv'}, {out / 'results.png'}")
        return
    out = run_ablation(ab, command=command)
    print(f"results: {out / 'results.md'}, {out / 'results.csv'}, {out / 'summary.csv'}, {out / 'results.png'}")


def take_report_only(argv: list[str]) -> tuple[list[str], bool, Optional[str]]:
    """(the arguments without `--report-only [FOLDER]`, whether it was given, FOLDER or None)."""
    if REPORT_ONLY not in argv:
        return list(argv), False, None
    if argv.count(REPORT_ONLY) > 1:  # before FOLDER is taken: the second would be read as the folder
        raise UserError(f"{REPORT_ONLY} is given twice; give it once, optionally followed by the results folder.")
    i = argv.index(REPORT_ONLY)
    following = argv[i + 1] if i + 1 < len(argv) else None
    folder = following if following is not None and "=" not in following else None
    return argv[:i] + argv[i + (2 if folder else 1):], True, folder


main.__doc__ = __doc__  # --help prints the module's usage
main.settings = ablation_settings
