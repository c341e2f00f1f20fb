"""The ablation's results: one `CellResult` per finished cell, read and written as csv, its
statistics over seeds, and the paper's numbers the group-count tables stand beside."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import UserError
from .grid import Cell

NAN = math.nan


@dataclass
class CellResult:
    """One cell's training settings and scores (NaN sample scores: the cell diverged)."""

    norm: str
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    heldout_loss: float
    frechet: float = NAN
    frechet_floor: float = NAN
    frechet_ratio: float = NAN
    kid: float = NAN
    kid_floor: float = NAN
    coverage: Optional[float] = NAN
    kl_uniform: Optional[float] = NAN
    accuracy: Optional[float] = NAN  # class-conditional models only
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    ema_halflife_images: float = NAN  # (results before the EMA's half-life setting: NaN)
    seed: int = 0  # the training seed (results written before seeds were an axis: seed 0)
    commit: str = ""  # the git commit of the code that made it ("-dirty": with uncommitted changes)
    groups: Optional[int] = None  # the cell's grouping, where the grid varies it (see grid.Cell)
    channels_per_group: Optional[int] = None
    processes: int = 1  # training processes (batch norm's statistics: per process; sync_batch's: over all)

    @property
    def cell(self) -> Cell:
        return Cell(self.norm, self.batch_size, self.seed, self.groups, self.channels_per_group)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CellResult":
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------------
# csv

COLUMNS = [f.name for f in dataclasses.fields(CellResult)]
REQUIRED = [f.name for f in dataclasses.fields(CellResult) if f.default is dataclasses.MISSING]
KINDS = typing.get_type_hints(CellResult)  # each column's type: str, int, float, or Optional of a number


def results_csv(rows: list[CellResult]) -> str:
    return csv_text(COLUMNS, [dataclasses.asdict(r) for r in rows])


def read_results_csv(path: Path) -> list[CellResult]:
    """The rows of a results.csv (a hand-edited one too): a line that is not text, a short or
    long row, a value of the wrong type or a cell given twice is a UserError naming path:line."""
    reader = csv.reader(io.StringIO(_text(path), newline=""))
    header = next(reader, None)
    if header is None:
        return []
    _check_header(header, f"{path}:1")
    rows: list[CellResult] = []
    first_line: dict[Cell, int] = {}
    line = reader.line_num + 1
    for fields in reader:
        where = f"{path}:{line}"
        if fields:  # a blank line holds no row
            result = _result(header, fields, where)
            if result.cell in first_line:
                raise UserError(f"{where}: the cell {result.cell.name} (the same norm, grouping, batch size and seed) "
                                f"is on line {first_line[result.cell]} too; delete one of the two lines.")
            first_line[result.cell] = line
            rows.append(result)
        line = reader.line_num + 1
    return rows


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: byte {data[exc.start]:#04x} is not text (results.csv is UTF-8 text); "
                        "fix or delete that line.") from None


def _check_header(header: list[str], where: str) -> None:
    """Every column a result needs, each once (a column of no field, e.g. an older result's, is
    read past)."""
    twice = [c for c in header if header.count(c) > 1]
    missing = [c for c in REQUIRED if c not in header]
    if twice or missing:
        problem = f"names the column {twice[0][:40]!r} twice" if twice else f"lacks the column {missing[0]}"
        raise UserError(f"{where}: the header {problem}; restore the header line as the sweep wrote it.")


def _result(header: list[str], fields: list[str], where: str) -> CellResult:
    if len(fields) != len(header):
        raise UserError(f"{where}: the row has {len(fields)} fields where the header names {len(header)}; "
                        "fix or delete that line.")
    return CellResult(**{name: _value(text, KINDS[name], name, where)
                         for name, text in zip(header, fields) if name in KINDS})


def _value(text: str, kind: Any, name: str, where: str) -> Any:
    """One field's value: its text, a number, or None (an empty field where the column allows it)."""
    if kind is str:
        if not text.isprintable():
            raise UserError(f"{where}: {name} is {text[:40]!r}, which holds characters that are not text; "
                            "fix or delete that line.")
        return text
    if text == "" and kind in (Optional[int], Optional[float]):
        return None
    number = int if kind in (int, Optional[int]) else float
    try:
        return number(text)
    except ValueError:
        raise UserError(f"{where}: {name} is {text[:40]!r}, not {'an integer' if number is int else 'a number'}; "
                        "fix or delete that line.") from None


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


# ---------------------------------------------------------------------------------------------
# Statistics over seeds


@dataclass
class SeedStats:
    """One score of one (row, batch size): a value per finished seed (NaN: diverged)."""

    values: list[Optional[float]]

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if v is not None and math.isfinite(v)]

    @property
    def diverged(self) -> int:
        return sum(v is not None and math.isnan(v) for v in self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.finite)) if self.finite else NAN

    @property
    def std(self) -> Optional[float]:
        """The sample standard deviation; None with fewer than two finite values."""
        return float(np.std(self.finite, ddof=1)) if len(self.finite) > 1 else None


def seed_stats(rows: list[CellResult], key: str) -> dict[tuple[str, int], SeedStats]:
    """Per (table row, batch size): the score of every finished seed."""
    stats: dict[tuple[str, int], SeedStats] = {}
    for r in rows:
        stats.setdefault((r.cell.row, r.batch_size), SeedStats([])).values.append(getattr(r, key))
    return stats


# ---------------------------------------------------------------------------------------------
# The paper


# The paper's Table 3 (ResNet-50 on ImageNet, 32 images per GPU, top-1 error in %). FIELD_NOTES
# gives G = 1, 32 and 64, 16 and 1 channels per group, and 24.4-24.7 for G = 2-16; the rest are the
# paper's table as we read it (two readers agreeing, not re-checked against the PDF here).
PAPER_COLUMN = "paper: ImageNet top-1 error (%)"
PAPER_TOP1_ERROR: dict[tuple[str, int], float] = {
    ("groups", 1): 25.3, ("groups", 2): 24.7, ("groups", 4): 24.6, ("groups", 8): 24.4,
    ("groups", 16): 24.6, ("groups", 32): 24.1, ("groups", 64): 24.6,
    ("channels_per_group", 64): 24.4, ("channels_per_group", 32): 24.5, ("channels_per_group", 16): 24.2,
    ("channels_per_group", 8): 24.3, ("channels_per_group", 4): 24.8, ("channels_per_group", 2): 25.6,
    ("channels_per_group", 1): 28.4,
}


def paper_error(cell: Cell) -> Optional[float]:
    """The paper's ImageNet error for the cell's grouping, where it is known."""
    if cell.norm != "group":
        return None
    key = ("groups", cell.groups) if cell.groups is not None else ("channels_per_group", cell.channels_per_group)
    return PAPER_TOP1_ERROR.get(key)
