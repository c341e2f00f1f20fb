"""The normalization ablation runner: per-cell configs, outputs, resuming an interrupted sweep,
the seed axis, and rebuilding the committed report from its results."""

from __future__ import annotations

import csv
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

import gn_diffusion.train.loop
from conftest import TINY_SWEEP
from gn_diffusion.ablation.grid import Cell, cell_config, load_ablation_config
from gn_diffusion.ablation.results import read_results_csv, results_csv
from gn_diffusion.ablation.sweep import code_commit, result_path, run_ablation
from gn_diffusion.cli import run_cli
from gn_diffusion.errors import ConfigError, UserError

def test_every_cell_sees_the_same_images_with_schedules_kept_in_images(tiny_sweep_config):
    ab = load_ablation_config(tiny_sweep_config, ["grid.batch_sizes=[2,8]", "grid.images_seen=64", "grid.lr_scaling=sqrt",
                                            "base.train.warmup_steps=4"])
    small, large = (cell_config(ab, Cell("group", b, 0), processes=1) for b in (2, 8))
    assert small.train.max_steps * 2 == large.train.max_steps * 8 == 64
    assert small.train.warmup_steps * 2 == large.train.warmup_steps * 8 == 4 * 4
    assert small.train.lr / large.train.lr == pytest.approx(0.5)  # sqrt(2 / 8)
    assert (small.model.norm, small.train.seed) == ("group", large.train.seed)
    assert cell_config(ab, Cell("group", 2, 0), processes=2).train.max_steps == 16  # images count every process
    assert cell_config(ab, Cell("group", 2, 7), processes=1).train.seed == 7  # the seed is the cell's


@pytest.mark.parametrize("override", [
    "grid.norms=[group,nonsense]", "grid.batch_sizes=[2,2]", "grid.images_seen=30", "grid.lr_scaling=cubic",
    "base.data.dataset=image_folder", "grid.bogus=1", "eval.num_images=1",
    "base.runtime.cpu_threads=-1", "grid.batch_sizes=[]", "grid.norms=[]", "grid.images_seen=nan",
    "base.model.groups=3", "eval.extractor=nocolon", "loss_triples=0",
    "grid.seeds=[]", "grid.seeds=[1,1]",
])
def test_bad_grids_are_refused_before_anything_runs(tiny_sweep_config, override):
    with pytest.raises(ConfigError):
        load_ablation_config(tiny_sweep_config, [override])


def test_cell_model_shapes_are_checked_with_the_cell_named(tiny_sweep_config):
    with pytest.raises(ConfigError, match=r"cell group-b2-s0: 'model.groups' 3"):
        load_ablation_config(tiny_sweep_config, ["base.model.groups=3"])
    # Batch norm ignores model.groups, so only the group-norm cells are refused.
    load_ablation_config(tiny_sweep_config, ["base.model.groups=3", "grid.norms=[batch]"])


def test_the_old_threads_key_is_read_as_base_runtime_cpu_threads(tmp_path, capsys):
    old = {**TINY_SWEEP, "base": {k: v for k, v in TINY_SWEEP["base"].items() if k != "runtime"}, "threads": 2}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    assert load_ablation_config(path).base.runtime.cpu_threads == 2
    assert "note: threads is now base.runtime.cpu_threads" in capsys.readouterr().err
    assert load_ablation_config(path, ["base.runtime.cpu_threads=3"]).base.runtime.cpu_threads == 3  # the new key wins
    with pytest.raises(ConfigError, match="base.runtime.cpu_threads"):
        load_ablation_config(path, ["threads=-1"])


def test_the_old_reference_batch_size_is_read_as_base_batch_size(tmp_path, capsys):
    grid = {k: v for k, v in TINY_SWEEP["grid"].items() if k != "base_batch_size"}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**TINY_SWEEP, "grid": {**grid, "reference_batch_size": 2}}))
    assert load_ablation_config(path).grid.base_batch_size == 2
    assert "note: grid.reference_batch_size is now grid.base_batch_size" in capsys.readouterr().err


def test_cli_reports_a_missing_config_in_one_line(tmp_path, capsys):
    from gn_diffusion.ablation.command import main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err and "Traceback" not in err


def test_tiny_sweep_writes_results_and_resumes_after_an_interruption(tiny_sweep_config, monkeypatch):
    real_train = gn_diffusion.train.loop.train
    calls = []

    def interrupted_after_two_cells(cfg, **kwargs):
        calls.append(cfg.train.output_dir)
        out = real_train(cfg, **kwargs)
        if len(calls) == 3:  # killed after the third cell's training, before its scoring
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(gn_diffusion.train.loop, "train", interrupted_after_two_cells)
    ab = load_ablation_config(tiny_sweep_config)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(ab, progress=False)
    out = tiny_sweep_config.parent / "sweep"
    done = [result_path(out, Cell("group", 2, 0)), result_path(out, Cell("group", 4, 0))]
    assert all(p.is_file() for p in done) and not result_path(out, Cell("batch", 2, 0)).exists()
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2  # the summary already holds the finished cells
    stamps = [p.stat().st_mtime_ns for p in done]

    calls.clear()
    run_ablation(ab, progress=False, command="python -m gn_diffusion.ablation tiny.yaml")
    assert [c.rsplit("/", 1)[-1] for c in calls] == ["batch-b2-s0", "batch-b4-s0"]  # finished cells not redone
    assert [p.stat().st_mtime_ns for p in done] == stamps
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["norm"], int(r["batch_size"])) for r in rows} == {("group", 2), ("group", 4), ("batch", 2), ("batch", 4)}
    assert all(int(r["steps"]) * int(r["batch_size"]) == 16 for r in rows)
    assert all(float(r["frechet"]) > 0 and float(r["heldout_loss"]) > 0 for r in rows)
    assert len({r["frechet_floor"] for r in rows}) == 1  # one floor for the whole sweep
    table = (out / "results.md").read_text()
    assert "| batch |" in table and "| group |" in table and f"{float(rows[0]['frechet']):.3f}" in table
    assert "python -m gn_diffusion.ablation tiny.yaml" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(UserError, match="other settings"):  # another sweep's settings: refused
        run_ablation(load_ablation_config(tiny_sweep_config, ["grid.images_seen=32"]), progress=False)


def test_seeds_are_an_axis_and_report_only_rebuilds_the_report_byte_for_byte(tiny_sweep_config, capsys):
    from gn_diffusion.ablation.command import main

    grid = ["grid.norms=[group]", "grid.batch_sizes=[4]", "grid.seeds=[0,1]"]
    run_cli(main, [str(tiny_sweep_config), *grid])
    out = tiny_sweep_config.parent / "sweep"
    rows = read_results_csv(out / "results.csv")
    assert [(r.norm, r.batch_size, r.seed) for r in rows] == [("group", 4, 0), ("group", 4, 1)]
    assert rows[0].heldout_loss != rows[1].heldout_loss  # another seed, another model
    assert rows[0].commit == rows[1].commit == code_commit()
    assert re.fullmatch(r"([0-9a-f]{40}(-dirty)?)?", rows[0].commit)
    losses = [r.heldout_loss for r in rows]
    table = (out / "results.md").read_text()
    assert "seeds 0, 1" in table and "(mean ± std over 2 training seeds)" in table
    mean, std = sum(losses) / 2, abs(losses[0] - losses[1]) / math.sqrt(2)
    assert f"| group | {mean:.4f} ± {std:.4f} | - |" in table  # one batch size: no spread
    assert ("Made with commit" in table) == bool(rows[0].commit)
    with open(out / "summary.csv") as f:
        (summary,) = csv.DictReader(f)
    assert int(summary["seeds"]) == 2 and float(summary["heldout_loss_mean"]) == pytest.approx(mean)
    assert float(summary["heldout_loss_std"]) == pytest.approx(std)

    made = {name: (out / name).read_bytes() for name in ("results.md", "summary.csv", "results.csv")}
    for name in ("results.md", "summary.csv", "results.png"):
        (out / name).unlink()
    for name in (tiny_sweep_config.parent / "sweep" / "cells").iterdir():
        shutil.rmtree(name)  # nothing but results.csv is needed
    run_cli(main, [str(tiny_sweep_config), *grid, "--report-only"])
    assert {name: (out / name).read_bytes() for name in made} == made
    assert (out / "results.png").is_file() and "rebuilt from 2 results" in capsys.readouterr().out


ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "ablation"


# Every committed table: the folder, and the ablate arguments that made it.
COMMITTED = {
    "norms": ["configs/ablation_norms.yaml"],
    "groups": ["configs/ablation_groups.yaml"],
    "syncbn": ["configs/ablation_norms.yaml", "grid.norms=[sync_batch,batch,group]", "grid.batch_sizes=[2,4]",
               "grid.seeds=[0]"],
}


@pytest.mark.parametrize("folder", sorted(COMMITTED))
def test_report_only_rebuilds_the_committed_tables_byte_for_byte(tmp_path, monkeypatch, folder):
    from gn_diffusion.ablation.command import main

    shutil.copy(DOCS / folder / "results.csv", tmp_path / "results.csv")
    monkeypatch.chdir(ROOT)  # the command quoted in results.md names the config as the docs do
    run_cli(main, [*COMMITTED[folder], "--report-only", str(tmp_path)])
    for name in ("results.md", "summary.csv"):
        assert (tmp_path / name).read_bytes() == (DOCS / folder / name).read_bytes(), name
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_written_result_quotes_the_generated_tables():
    readme = (DOCS / "README.md").read_text()
    generated = "".join((DOCS / folder / "results.md").read_text() for folder in COMMITTED)
    quoted = re.findall(r"\*\*[^\n]+\*\*[^\n]*\n\n(?:\|[^\n]*\n)+", readme)
    assert len(quoted) >= 3 and all(block in generated for block in quoted)


def test_results_written_before_seeds_and_commits_still_read(tmp_path):
    (row,) = read_results_csv(DOCS / "norms" / "results.csv")[:1]
    old_columns = [c for c in results_csv([row]).splitlines()[0].split(",") if c not in ("seed", "commit")]
    lines = results_csv([row]).splitlines()
    values = dict(zip(lines[0].split(","), lines[1].split(",")))
    (tmp_path / "old.csv").write_text(",".join(old_columns) + "\n" + ",".join(values[c] for c in old_columns) + "\n")
    (old,) = read_results_csv(tmp_path / "old.csv")
    assert (old.seed, old.commit) == (0, "") and old.frechet == row.frechet and old.accuracy is None


def test_report_only_without_results_is_one_sentence(tiny_sweep_config, capsys):
    from gn_diffusion.ablation.command import main

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, [str(tiny_sweep_config), "--report-only", str(tiny_sweep_config.parent / "nothing")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "results.csv" in err and "Traceback" not in err
