"""Turn a downloaded data set archive into the image folders a config reads.

usage: python -m gn_diffusion.data.convert cifar10 ARCHIVE OUT
       python -m gn_diffusion.data.convert fashion-mnist DIR OUT

cifar10: ARCHIVE is CIFAR-10's binary version, cifar-10-binary.tar.gz (data_batch_1.bin ..
data_batch_5.bin, test_batch.bin and batches.meta.txt, the class names). It writes
OUT/train/<class>/<batch>-<record>.png (50,000 images) and OUT/test/<class>/<record>.png
(10,000), what configs/cifar10.yaml reads (data.path=OUT/train, eval.reference_dir=OUT/test).
Each record of a .bin file is one label byte and 3072 bytes of pixels, the red, green and blue
32x32 planes in turn; the archive is read as bytes, never unpickled, and a member is read only
when its header gives CIFAR-10's size for it (10,000 records a batch). Each split is written to a
temporary folder and renamed into place when complete; an OUT that already holds a split is
refused rather than overwritten.

fashion-mnist: DIR holds Fashion-MNIST's four idx files as the data set's site and Debian's
dataset-fashion-mnist package (/usr/share/datasets/fashion-mnist) ship them:
train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and
t10k-labels-idx1-ubyte.gz. It writes OUT/train/<class>/<i>.png (60,000 grey 28x28 images) and
OUT/test/<class>/<i>.png (10,000); the class folders are named 0-t-shirt-top, 1-trouser, ..
9-ankle-boot, so they sort in the data set's label order (data.class_labels=true reads them so).
Each file's magic number and header counts are checked, and it is read no further than its
header's size: a file that inflates past it is refused, as are labels outside 0-9.
"""

from __future__ import annotations

import gzip
import math
import re
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from ..cli import run_cli
from ..errors import UserError
from ..files import atomic_folder

CIFAR_SIZE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIZE * CIFAR_SIZE
CIFAR_BATCH_RECORDS = 10_000  # records in every .bin file, training and test alike
CIFAR_TRAIN = tuple(f"data_batch_{k}.bin" for k in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_META = "batches.meta.txt"
CIFAR_META_MAX = 4096  # bytes: ten short names, one a line
MAX_CLASS_NAME = 100  # characters: a folder name every file system takes


def cifar_sizes() -> dict[str, range]:
    """The byte sizes each member of the archive may have: a batch exactly its records, the
    class names at most a few lines. A member of any other size is refused unread, so a small
    archive that inflates to gigabytes never reaches memory."""
    batch = CIFAR_BATCH_RECORDS * CIFAR_RECORD
    return {**{name: range(batch, batch + 1) for name in (*CIFAR_TRAIN, CIFAR_TEST)},
            CIFAR_META: range(1, CIFAR_META_MAX + 1)}


def read_members(archive: Path, sizes: dict[str, range]) -> dict[str, bytes]:
    """The bytes of the members of a .tar.gz named in `sizes` (by base name, in any folder), each
    of a size `sizes` allows (checked from its header before it is read, and read no further)."""
    if not archive.is_file():
        raise UserError(f"archive {archive} does not exist; download cifar-10-binary.tar.gz and pass its path.")
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in sizes and name not in found:
                    check_size(archive, name, member.size, sizes[name])
                    found[name] = tar.extractfile(member).read(sizes[name].stop)
                    check_size(archive, name, len(found[name]), sizes[name])
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk's failure: run_cli says it in one sentence
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever it said
        raise UserError(f"{archive} is not a readable .tar.gz archive ({detail}); "
                        "download cifar-10-binary.tar.gz again.") from None
    missing = [n for n in sizes if n not in found]
    if missing:
        raise UserError(f"{archive} lacks {', '.join(missing)}; it should be CIFAR-10's binary version, "
                        "cifar-10-binary.tar.gz (not the python or matlab one).")
    return found


def check_size(archive: Path, name: str, size: int, allowed: range) -> None:
    if size not in allowed:
        want = f"{allowed.start}" if len(allowed) == 1 else f"at most {allowed.stop - 1}"
        raise UserError(f"{name} in {archive} holds {size} bytes where CIFAR-10's holds {want}; the archive is "
                        "damaged or not CIFAR-10's binary version: download cifar-10-binary.tar.gz again.")


def class_names(text: bytes, archive: Path) -> list[str]:
    """The ten class names of batches.meta.txt, one a line (blank lines ignored), each checked to
    be a safe folder name."""
    lines = [(n, line.strip()) for n, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), 1)]
    lines = [(n, name) for n, name in lines if name]
    for n, name in lines:
        check_class_name(name, n, archive)
    names = [name for _, name in lines]
    if len(names) != 10 or len({n.casefold() for n in names}) != len(names):
        raise UserError(f"{CIFAR_META} in {archive} should name 10 distinct classes, one a line; "
                        f"it names {len(names)}: {', '.join(names[:12])}.")
    return names


def check_class_name(name: str, line: int, archive: Path) -> None:
    """Refuse a class name that cannot be a folder of its own (it becomes OUT/<split>/<name>)."""
    a_folder_name = (name.isprintable() and len(name) <= MAX_CLASS_NAME and name not in (".", "..")
                     and "/" not in name and "\\" not in name)
    if not a_folder_name:
        raise UserError(f"{CIFAR_META}:{line} in {archive} names the class {name[:MAX_CLASS_NAME]!r}, which cannot "
                        f"be a folder name (printable, at most {MAX_CLASS_NAME} characters, no / or \\, not . or ..); "
                        "the archive is damaged: download cifar-10-binary.tar.gz again.")


def records(data: bytes, name: str, archive: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], images uint8 [N, 32, 32, 3]) of one .bin file (of whole records: read_members
    checked its size)."""
    table = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = table[:, 0]
    if labels.max() >= num_classes:
        raise UserError(f"{name} in {archive} has label {labels.max()} for {num_classes} classes; "
                        "the archive is damaged: download it again.")
    images = table[:, 1:].reshape(-1, 3, CIFAR_SIZE, CIFAR_SIZE).transpose(0, 2, 3, 1)
    return labels, images


def write_split(folder: Path, classes: list[str], parts: list[tuple[str, np.ndarray, np.ndarray]]) -> int:
    """Write `parts` ((name prefix, labels, images), in order) as folder/<class>/<prefix><i>.png,
    whole or not at all; returns the number of images."""
    from PIL import Image

    count = 0
    with atomic_folder(folder) as tmp:
        for name in classes:
            (tmp / name).mkdir()
        for prefix, labels, images in parts:
            for i, (label, image) in enumerate(zip(labels, images)):
                Image.fromarray(image).save(tmp / classes[label] / f"{prefix}{i:05d}.png")
            count += len(labels)
    return count


def check_splits_free(out: Path) -> None:
    """Refuse an OUT that already holds a split: a converter never replaces one."""
    taken = [out / s for s in ("train", "test") if (out / s).exists()]
    if taken:
        raise UserError(f"{taken[0]} already exists; remove it or choose another output folder.")


def convert_cifar10(archive: str | Path, out: str | Path) -> dict[str, int]:
    """The CIFAR-10 binary archive as OUT/train and OUT/test image folders; {split: images}."""
    archive, out = Path(archive), Path(out)
    check_splits_free(out)
    members = read_members(archive, cifar_sizes())  # all checked before writing
    classes = class_names(members[CIFAR_META], archive)
    train = [(f"{k}-", *records(members[n], n, archive, len(classes))) for k, n in enumerate(CIFAR_TRAIN, start=1)]
    test = [("", *records(members[CIFAR_TEST], CIFAR_TEST, archive, len(classes)))]
    del members
    return {"train": write_split(out / "train", classes, train), "test": write_split(out / "test", classes, test)}


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: four gzipped idx files

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_SIZE = 28
FASHION_COUNTS = {"train": 60_000, "t10k": 10_000}  # images in each split's files, as the data set gives them
IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # idx magic numbers: uint8 data, 3 and 1 dimensions


def fashion_folder(label: int) -> str:
    """Class `label`'s folder: its index, then its name in lower case with / and spaces as -
    ('0-t-shirt-top'), so the folders sort in label order."""
    return f"{label}-" + re.sub(r"[^a-z0-9]+", "-", FASHION_CLASSES[label].lower()).strip("-")


def read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array of a gzipped idx file whose header must give `magic` and `shape`. It is
    read no further than one byte past that shape's data, so a file that inflates past its
    header is refused without filling memory."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; DIR must hold Fashion-MNIST's four idx files "
                        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz and their t10k- pair).")
    header_bytes, size = 4 + 4 * len(shape), math.prod(shape)
    try:
        with gzip.open(path, "rb") as f:
            header, data = f.read(header_bytes), f.read(size + 1)
    except (EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError without errno
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the disk's failure: run_cli says it in one sentence
        raise UserError(f"{path} is not a readable .gz file ({' '.join(str(exc).split()) or type(exc).__name__}); "
                        "download it again.") from None
    check_idx_header(path, header, magic, shape)
    if len(data) != size:
        held = "more" if len(data) > size else f"{len(data)} bytes"
        raise UserError(f"{path} holds {held} of data where its header gives {size} bytes; the file is damaged: "
                        "download it again.")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def check_idx_header(path: Path, header: bytes, magic: int, shape: tuple[int, ...]) -> None:
    """Refuse a header that is cut short, of another kind of idx file, or of other counts."""
    if len(header) < 4 + 4 * len(shape):
        raise UserError(f"{path} ends inside its idx header; the file is damaged: download it again.")
    got = int.from_bytes(header[:4], "big")
    dims = tuple(int.from_bytes(header[k: k + 4], "big") for k in range(4, len(header), 4))
    if got != magic:
        raise UserError(f"{path} has the magic number 0x{got:08x} where an idx file of "
                        f"{'images' if magic == IDX_IMAGES else 'labels'} has 0x{magic:08x}; pass Fashion-MNIST's "
                        "own files, under their own names.")
    if dims != shape:
        raise UserError(f"{path}'s header gives {' x '.join(map(str, dims))} where Fashion-MNIST's file gives "
                        f"{' x '.join(map(str, shape))}; the file is damaged or of another data set: download it again.")


def fashion_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels [N], images uint8 [N, 28, 28]) of one split (train or t10k), checked."""
    n = FASHION_COUNTS[split]
    images = read_idx(folder / f"{split}-images-idx3-ubyte.gz", IDX_IMAGES, (n, FASHION_SIZE, FASHION_SIZE))
    labels_file = folder / f"{split}-labels-idx1-ubyte.gz"
    labels = read_idx(labels_file, IDX_LABELS, (n,))
    if labels.max(initial=0) >= len(FASHION_CLASSES):
        raise UserError(f"{labels_file} has the label {labels.max()}, outside Fashion-MNIST's classes 0-9; the "
                        "file is damaged: download it again.")
    return labels, images


def convert_fashion_mnist(folder: str | Path, out: str | Path) -> dict[str, int]:
    """Fashion-MNIST's idx files as OUT/train and OUT/test image folders; {split: images}."""
    folder, out = Path(folder), Path(out)
    check_splits_free(out)
    splits = {"train": fashion_split(folder, "train"), "test": fashion_split(folder, "t10k")}  # all checked first
    classes = [fashion_folder(label) for label in range(len(FASHION_CLASSES))]
    return {name: write_split(out / name, classes, [("", *split)]) for name, split in splits.items()}


CONVERTERS = {"cifar10": convert_cifar10, "fashion-mnist": convert_fashion_mnist}


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in CONVERTERS:
        raise UserError("usage: python -m gn_diffusion.data.convert cifar10 ARCHIVE OUT, or fashion-mnist DIR OUT "
                        f"(got {' '.join(argv) or 'no arguments'}).")
    kind, archive, out = argv
    counts = CONVERTERS[kind](archive, out)
    print(", ".join(f"{out}/{split}: {n} images" for split, n in counts.items()))


main.__doc__ = __doc__  # --help prints the module's usage

if __name__ == "__main__":
    run_cli(main)
