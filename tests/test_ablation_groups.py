"""The group-count ablation: group norm's grouping as a grid axis, its report beside the paper's
numbers, and sweep processes side by side on one folder."""

from __future__ import annotations

import csv
import fcntl

import pytest

import gn_diffusion.ablation.sweep

from gn_diffusion.ablation.grid import Cell, cell_config, grid_cells, grid_rows, load_ablation_config
from gn_diffusion.ablation.results import read_results_csv
from gn_diffusion.ablation.sweep import CLAIMS_DIR
from gn_diffusion.cli import run_cli
from gn_diffusion.errors import ConfigError

GROUPED = ["grid.norms=[group]", "grid.groups=[1,2]", "grid.batch_sizes=[4]"]


def test_group_norm_gets_one_row_per_grouping_and_other_norms_one(tiny_sweep_config):
    ab = load_ablation_config(tiny_sweep_config, ["grid.norms=[group,batch]", "grid.groups=[1,2]",
                                                  "grid.channels_per_group=[4]", "grid.batch_sizes=[2]"])
    assert grid_rows(ab) == ["group G=1", "group G=2", "group 4 ch/group", "batch"]
    assert [c.name for c in grid_cells(ab)] == ["group-g1-b2-s0", "group-g2-b2-s0", "group-c4-b2-s0", "batch-b2-s0"]
    by_groups = cell_config(ab, Cell("group", 2, 0, groups=1), processes=1).model
    by_width = cell_config(ab, Cell("group", 2, 0, channels_per_group=4), processes=1).model
    assert (by_groups.groups, by_groups.channels_per_group) == (1, None)
    assert (by_width.groups, by_width.channels_per_group) == (None, 4)
    # Without a grouping axis the cells and their folders are the norm sweep's, as before.
    plain = load_ablation_config(tiny_sweep_config)
    assert [c.name for c in grid_cells(plain)][:2] == ["group-b2-s0", "group-b4-s0"]


@pytest.mark.parametrize("override, named", [
    ("grid.groups=[]", "grid.groups"), ("grid.groups=[0,2]", "grid.groups"), ("grid.groups=[2,2]", "twice"),
    ("grid.channels_per_group=[-4]", "grid.channels_per_group"), ("grid.groups=[3]", "group-g3-b2-s0"),
])
def test_bad_grouping_axes_are_refused_before_anything_runs(tiny_sweep_config, override, named):
    with pytest.raises(ConfigError, match=named):
        load_ablation_config(tiny_sweep_config, [override])


def test_a_grouping_axis_needs_a_norm_with_groups(tiny_sweep_config):
    with pytest.raises(ConfigError, match="no norm in grid.norms"):
        load_ablation_config(tiny_sweep_config, ["grid.norms=[batch,layer]", "grid.groups=[2]"])


def test_a_held_cell_is_left_then_taken_back_and_the_report_stands_beside_the_paper(tiny_sweep_config, capsys):
    """Side by side: a cell another sweep process holds is left to it, and taken back at the end
    when that process dies without finishing it. Then the grouping report, with the paper's
    column, and its --report-only rebuild, byte for byte."""
    from gn_diffusion.ablation.command import main

    out = tiny_sweep_config.parent / "sweep"
    held, free = Cell("group", 4, 0, groups=1), Cell("group", 4, 0, groups=2)
    lock = out / CLAIMS_DIR / f"{held.name}.lock"
    lock.parent.mkdir(parents=True)
    other = open(lock, "a")  # another open file: the same OS lock another sweep process would hold
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    trained = []
    real_score = gn_diffusion.ablation.sweep.score_cell

    def score_then_let_go(cfg, *args):
        trained.append(cfg.train.output_dir.rsplit("/", 1)[-1])
        other.close()  # the holder dies without finishing its cell: the lock goes with it
        return real_score(cfg, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gn_diffusion.ablation.sweep, "score_cell", score_then_let_go)
        run_cli(main, [str(tiny_sweep_config), *GROUPED])
    assert trained == [free.name, held.name]  # the held cell left, then taken back at the end
    printed = capsys.readouterr()
    assert f"{held.name}: another sweep process is training it" in printed.out + printed.err
    rows = read_results_csv(out / "results.csv")
    assert [(r.groups, r.channels_per_group) for r in rows] == [(1, None), (2, None)]  # read back from csv

    table = (out / "results.md").read_text()
    assert "| norm | batch 4 | paper: ImageNet top-1 error (%) |" in table
    loss = {r.groups: r.heldout_loss for r in rows}
    assert f"| group G=1 | {loss[1]:.4f} | 25.3 |" in table and f"| group G=2 | {loss[2]:.4f} | 24.7 |" in table
    assert "| norm | batch 4 |\n" in table  # the coverage table has no paper column
    with open(out / "summary.csv") as f:
        assert [r["norm"] for r in csv.DictReader(f)] == ["group G=1", "group G=2"]
    made = {name: (out / name).read_bytes() for name in ("results.md", "summary.csv")}
    for name in ("results.md", "summary.csv", "results.png"):
        (out / name).unlink()
    run_cli(main, [str(tiny_sweep_config), *GROUPED, "--report-only"])
    assert {name: (out / name).read_bytes() for name in made} == made
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
