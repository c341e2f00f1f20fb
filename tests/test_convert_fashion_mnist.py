"""python -m gn_diffusion.data.convert fashion-mnist DIR OUT: the class folders it writes from the four
idx files, and the files it refuses in one sentence (another magic number, cut short, counts that
disagree, labels outside 0-9, data past the header). The tests write tiny idx files: 12 training
and 10 test images instead of 60,000 and 10,000."""

import gzip

import numpy as np
import pytest
import torch

from gn_diffusion.data import convert
from gn_diffusion.data.dataset import build_dataset
from conftest import assert_fails_cleanly, tiny_config

COUNTS = {"train": 12, "t10k": 10}  # every class in both splits, as in the data set


@pytest.fixture(autouse=True)
def small_splits(monkeypatch):
    monkeypatch.setattr(convert, "FASHION_COUNTS", COUNTS)


def idx_bytes(magic: int, array: np.ndarray, dims=None) -> bytes:
    dims = array.shape if dims is None else dims
    return b"".join(int(v).to_bytes(4, "big") for v in (magic, *dims)) + array.astype(np.uint8).tobytes()


def write_fashion(folder, change=None):
    """The four idx files of a tiny Fashion-MNIST; `change` maps a file name to a function of its
    raw (uncompressed) bytes. Returns {split: (labels, images)}."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    truth = {}
    for split, n in COUNTS.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8)[::-1] * 3 % 10
        truth[split] = (labels, images)
        for name, data in ((f"{split}-images-idx3-ubyte.gz", idx_bytes(convert.IDX_IMAGES, images)),
                           (f"{split}-labels-idx1-ubyte.gz", idx_bytes(convert.IDX_LABELS, labels))):
            (folder / name).write_bytes(gzip.compress((change or {}).get(name, bytes)(data)))
    return truth


def test_fashion_mnist_becomes_class_folders_in_label_order(tmp_path, capsys):
    truth = write_fashion(tmp_path / "raw")
    convert.main(["fashion-mnist", str(tmp_path / "raw"), str(tmp_path / "out")])
    assert "out/train: 12 images" in capsys.readouterr().out
    classes = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert classes == ["0-t-shirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt",
                       "7-sneaker", "8-bag", "9-ankle-boot"]
    for split, folder in (("train", "train"), ("t10k", "test")):
        cfg = tiny_config(tmp_path / "run", "data.dataset=image_folder", f"data.path={tmp_path / 'out' / folder}",
                          "data.class_labels=true", "model.image_size=28")
        dataset = build_dataset(cfg)
        labels, images = truth[split]
        order = np.lexsort((np.arange(len(labels)), labels))  # the folders' order: by class, then index
        batch = dataset.__getitems__(range(len(dataset)))
        assert torch.equal(batch["image"], torch.from_numpy(images[order]).unsqueeze(1))  # PNG is lossless
        assert batch["label"].tolist() == sorted(labels.tolist())


BAD = {
    "magic": ({"train-images-idx3-ubyte.gz": lambda b: (0x0801).to_bytes(4, "big") + b[4:]},
              "train-images-idx3-ubyte.gz has the magic number 0x00000801 where an idx file of images has 0x00000803"),
    "truncated": ({"t10k-images-idx3-ubyte.gz": lambda b: b[:-5]},
                  f"t10k-images-idx3-ubyte.gz holds {10 * 784 - 5} bytes of data where its header gives {10 * 784}"),
    "short header": ({"train-labels-idx1-ubyte.gz": lambda b: b[:6]}, "ends inside its idx header"),
    "counts disagree": ({"train-labels-idx1-ubyte.gz": lambda b: b[:4] + (11).to_bytes(4, "big") + b[8:-1]},
                        "train-labels-idx1-ubyte.gz's header gives 11 where Fashion-MNIST's file gives 12"),
    "label out of range": ({"t10k-labels-idx1-ubyte.gz": lambda b: b[:-1] + bytes([10])},
                           "has the label 10, outside Fashion-MNIST's classes 0-9"),
    "inflates past its header": ({"train-images-idx3-ubyte.gz": lambda b: b + bytes(10**6)},
                                 "holds more of data where its header gives"),
    "not gzip": ({"t10k-labels-idx1-ubyte.gz": None}, "t10k-labels-idx1-ubyte.gz is not a readable .gz file"),
    "missing": ({"t10k-images-idx3-ubyte.gz": "missing"}, "t10k-images-idx3-ubyte.gz does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_idx_file_is_one_sentence_and_writes_nothing(tmp_path, capsys, case):
    change, message = BAD[case]
    name, how = next(iter(change.items()))
    write_fashion(tmp_path / "raw", change if callable(how) else None)
    if how is None:
        (tmp_path / "raw" / name).write_bytes(b"plain bytes, not gzip")
    elif how == "missing":
        (tmp_path / "raw" / name).unlink()
    (tmp_path / "out").mkdir()
    assert_fails_cleanly(capsys, convert.main, ["fashion-mnist", str(tmp_path / "raw"), str(tmp_path / "out")],
                         message, tmp_path)
    assert not list((tmp_path / "out").iterdir())


def test_a_folder_that_holds_a_split_is_never_replaced(tmp_path, capsys):
    write_fashion(tmp_path / "raw")
    (tmp_path / "out" / "test").mkdir(parents=True)
    (tmp_path / "out" / "test" / "mine.png").write_bytes(b"a user's file")
    assert_fails_cleanly(capsys, convert.main, ["fashion-mnist", str(tmp_path / "raw"), str(tmp_path / "out")],
                         "already exists; remove it or choose another output folder", tmp_path)
