"""Train one ablation cell on several CPU processes, then score it on the main one; for
docs/ablation/syncbn.md (the sync_batch row).

usage: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port PORT \
    docs/ablation/syncbn_cell.py CONFIG.yaml [key=value ...]   (a grid of exactly one cell)

`python -m gn_diffusion.ablate` cannot run under that launch yet: its accelerate.PartialState()
does not read ACCELERATE_USE_CPU (Accelerator does), so on a machine without a GPU each process
ran the whole sweep alone; and training ends with Accelerator.end_training(), which destroys the
process group that the sweep's next wait_for_everyone needs. So this trains the one cell on
every process and scores it, with the sweep's own functions, on the main process alone.
"""

import dataclasses
import shlex
import sys
import time
from pathlib import Path

from accelerate import PartialState

from gn_diffusion.ablation_grid import cell_config, grid_cells, load_ablation_config, validate_ablation
from gn_diffusion.ablation_sweep import claim_folder, prepare_sweep, result_path, score_cell, write_summary
from gn_diffusion.cli import run_cli, split_args
from gn_diffusion.files import write_text_atomic
from gn_diffusion.threads import cpu_threads
from gn_diffusion.training import train


def main(argv: list[str]) -> None:
    state = PartialState(cpu=True)  # before anything asks for a plain PartialState()
    path, overrides = split_args(argv, default_config=None)
    ab = load_ablation_config(path, overrides)
    validate_ablation(ab, state.num_processes)
    (cell,) = grid_cells(ab)  # one cell: the process group ends with its training
    if state.is_main_process:
        claim_folder(Path(ab.output_dir), ab)
    state.wait_for_everyone()
    cfg = cell_config(ab, cell, state.num_processes)
    with cpu_threads(ab.base.runtime.cpu_threads):
        started = time.perf_counter()
        train(cfg, progress=False)
        trained = time.perf_counter()
        if not state.is_main_process:
            return
        sweep = prepare_sweep(ab, " ".join(["docs/ablation/syncbn_cell.py", *map(shlex.quote, argv)]))
        result = score_cell(cfg, sweep.evaluator, sweep.triples, ab.eval.num_samples)
    result = dataclasses.replace(result, train_seconds=round(trained - started, 1),
                                 eval_seconds=round(time.perf_counter() - trained, 1), commit=sweep.commit)
    write_text_atomic(result_path(sweep.out, cell), result.to_json())
    write_summary(sweep)
    print(f"{cell.name}: held-out loss {result.heldout_loss:.4f}, Frechet {result.frechet:.3f}")


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
