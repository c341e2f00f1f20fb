"""A Hugging Face `datasets` split as a lazy image source (data.dataset: hf).

data.path is a folder written by `save_to_disk` (read with `load_from_disk`, memory-mapped) or
anything `load_dataset` takes: a Hub name or a local folder of data files. `load_dataset` runs
no code from the data set (current `datasets` has no dataset scripts, and nothing here asks for
remote code). The image column is read with decoding off, so a fetch copies only its rows'
encoded bytes out of the Arrow file and PIL decodes them in the loader's worker.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import UserError
from .sources import DataListing, LazyImages, decode_errors, pil_pixel_limit, read_image


class HFImages(LazyImages):
    """Rows `rows` of a datasets.Dataset whose `column` holds undecoded images ({bytes, path});
    `fingerprint` is the split's as datasets computes it from its files."""

    def __init__(self, table, column: str, rows: np.ndarray, labels: torch.Tensor, where: str,
                 image_size: int, channels: int, max_pixels: int, fingerprint: str = ""):
        super().__init__(labels, image_size, channels, max_pixels)
        self.table, self.column, self.rows, self.where = table, column, rows, where
        self.fingerprint = fingerprint

    def listing(self) -> DataListing:
        """The split's fingerprint and the rows used: other data files or other rows change it."""
        return DataListing.of(len(self), (self.fingerprint.encode(), self.rows.tobytes()))

    def _sources(self, indices: Sequence[int]) -> list[Any]:
        cells = self.table[self.rows[np.asarray(indices, dtype=np.int64)].tolist()][self.column]
        return [cell["bytes"] if cell["bytes"] is not None else cell["path"] for cell in cells]

    def _name(self, i: int) -> str:
        return f"row {int(self.rows[i])} of {self.where}"


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def open_split(path: str, split: str, key: str, whole_ok: bool = True):
    """The datasets.Dataset of `split` in data.path; `key` names the setting that chose the
    split. A saved single Dataset (no split names) serves any split when `whole_ok`."""
    import datasets

    where = Path(path).expanduser()
    if is_saved_dataset(where):
        saved = _failing_as_user_error(lambda: datasets.load_from_disk(str(where)), path, "load_from_disk")
        if isinstance(saved, datasets.Dataset):
            if not whole_ok:
                raise UserError(f"{path} holds a single Dataset, no named splits, so {key}={split} is not in it; "
                                "save a DatasetDict with a held-out split, or set eval.reference_dir.")
            return saved
        if split not in saved:
            raise UserError(f"{path} has no split {split!r} (its splits: {', '.join(saved)}); set {key} to one of them.")
        return saved[split]
    return _failing_as_user_error(lambda: datasets.load_dataset(path, split=split), path, "load_dataset")


def _failing_as_user_error(load, path: str, how: str):
    """load(), with what datasets raises for a missing, unreachable or unreadable data set (or an
    unknown split) as one sentence."""
    import datasets

    try:
        return load()
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise UserError(f"cannot read the data set {path!r} with datasets.{how} ({detail}); set data.path to a "
                        "folder written by save_to_disk, a folder of data files, or a Hub name (online once).") from None


def image_column(features, name: Optional[str], path: str) -> str:
    """data.image_column, checked, or the first Image feature."""
    import datasets

    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if name is None:
        if not images:
            raise UserError(f"{path} has no Image column (its columns: {_described(features)}); set "
                            "data.image_column to the one holding the images, cast to datasets.Image.")
        return images[0]
    if name not in features:
        raise UserError(f"data.image_column={name} is not a column of {path} (its columns: {_described(features)}).")
    if not isinstance(features[name], datasets.Image):
        raise UserError(f"data.image_column={name} of {path} is {type(features[name]).__name__}, not Image; "
                        "cast it with dataset.cast_column(name, datasets.Image()) and save it again.")
    return name


def label_column(features, name: Optional[str], path: str) -> tuple[str, int]:
    """(data.label_column, checked, or the first ClassLabel feature; its number of classes, 0
    for a plain integer column: counted from the values)."""
    import datasets

    if name is None:
        labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if not labels:
            raise UserError(f"model.num_classes is set but {path} has no ClassLabel column (its columns: "
                            f"{_described(features)}); set data.label_column or model.num_classes=0.")
        return labels[0], features[labels[0]].num_classes
    feature = features.get(name)
    if isinstance(feature, datasets.ClassLabel):
        return name, feature.num_classes
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return name, 0
    raise UserError(f"data.label_column={name} is not a ClassLabel or integer column of {path} "
                    f"(its columns: {_described(features)}).")


def _described(features) -> str:
    return ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items()) or "none"


def _in_row_order(table, values: np.ndarray) -> np.ndarray:
    """Per-row `values` of the Arrow table put in the Dataset's row order: a select() or
    shuffle() view keeps a row map instead of moving rows."""
    indices = getattr(table, "_indices", None)
    return values if indices is None else values[indices.column(0).to_numpy()]


def label_values(table, name: str) -> np.ndarray:
    """A label column as int64, -1 where it is null (ClassLabel's own "no label" is -1 too)."""
    import pyarrow.compute as pc

    return _in_row_order(table, pc.fill_null(table.data.column(name), -1).to_numpy().astype(np.int64))


def image_present(table, name: str) -> np.ndarray:
    """Whether each row's image cell holds bytes or a path, from Arrow's validity bitmaps chunk
    by chunk: no image is decoded and no bytes are copied out of a memory-mapped file."""
    import pyarrow.compute as pc

    def present(chunk):
        empty = pc.and_(pc.is_null(pc.struct_field(chunk, "bytes")), pc.is_null(pc.struct_field(chunk, "path")))
        return pc.invert(pc.or_(pc.is_null(chunk), empty)).to_numpy(zero_copy_only=False)

    chunks = [present(chunk) for chunk in table.data.column(name).chunks]
    return _in_row_order(table, np.concatenate(chunks) if chunks else np.zeros(0, dtype=bool))


def hf_source(d, image_size: int, channels: int, use_labels: bool, split: Optional[str] = None,
              key: str = "data.split", whole_ok: bool = True) -> tuple[HFImages, int]:
    """A lazy source over `split` (default data.split) of data.path, and its number of classes
    (0 unless `use_labels`). Checked here, before training: the columns, the rows that hold an
    image (and a label), and that the first of them decodes."""
    import datasets

    split = split or d.split
    table = open_split(d.path, split, key, whole_ok)
    fingerprint = table._fingerprint
    column = image_column(table.features, d.image_column, d.path)
    labels, num_classes = None, 0
    if use_labels:
        name, num_classes = label_column(table.features, d.label_column, d.path)
        labels = label_values(table, name)
        num_classes = num_classes or int(labels.max(initial=-1)) + 1
    keep = image_present(table, column) & (labels >= 0 if labels is not None else True)
    rows = np.flatnonzero(keep).astype(np.int64)
    where = f"{d.path} ({split})"
    if len(rows) == 0:
        raise UserError(f"none of the {len(table)} rows of {where} holds an image{' and a label' * use_labels}; "
                        "check the data set.")
    if len(rows) < len(table):
        warnings.warn(f"skipped {len(table) - len(rows)} row(s) of {len(table)} in {where} without an image"
                      f"{' or a label' * use_labels}.", stacklevel=2)
    table = table.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    kept = torch.from_numpy(labels[rows]) if labels is not None else torch.full((len(rows),), -1, dtype=torch.int64)
    source = HFImages(table, column, rows, kept, where, image_size, channels, d.max_image_pixels, fingerprint)
    _check_first(source)
    return source, num_classes


def _check_first(source: HFImages) -> None:
    """Decode the first usable row: a column of something other than images fails now, in one
    sentence, instead of in every loader fetch."""
    try:
        with pil_pixel_limit(source.max_pixels):
            read_image(source._sources([0])[0], source.image_size, source.channels)
    except decode_errors() as exc:
        raise UserError(f"the first image of {source.where} cannot be decoded ({type(exc).__name__}: {exc}); "
                        "check data.image_column.") from None
