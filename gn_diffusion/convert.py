"""Turn a downloaded data set archive into the image folders a config reads.

usage: python -m gn_diffusion.convert cifar10 ARCHIVE OUT

cifar10: ARCHIVE is CIFAR-10's binary version, cifar-10-binary.tar.gz (data_batch_1.bin ..
data_batch_5.bin, test_batch.bin and batches.meta.txt, the class names). It writes
OUT/train/<class>/<batch>-<record>.png (50,000 images) and OUT/test/<class>/<record>.png
(10,000), what configs/cifar10.yaml reads (data.path=OUT/train, eval.reference_dir=OUT/test).
Each record of a .bin file is one label byte and 3072 bytes of pixels, the red, green and blue
32x32 planes in turn; the archive is read as bytes, never unpickled, and a member is read only
when its header gives CIFAR-10's size for it (10,000 records a batch). Each split is written to a
temporary folder and renamed into place when complete; an OUT that already holds a split is
refused rather than overwritten.
"""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from .cli import run_cli
from .errors import UserError
from .files import atomic_folder

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


def convert_cifar10(archive: str | Path, out: str | Path) -> dict[str, int]:
    """The CIFAR-10 binary archive as OUT/train and OUT/test image folders; {split: images}."""
    archive, out = Path(archive), Path(out)
    taken = [out / s for s in ("train", "test") if (out / s).exists()]
    if taken:
        raise UserError(f"{taken[0]} already exists; remove it or choose another output folder.")
    members = read_members(archive, cifar_sizes())  # all checked before writing
    classes = class_names(members[CIFAR_META], archive)
    train = [(f"{k}-", *records(members[n], n, archive, len(classes))) for k, n in enumerate(CIFAR_TRAIN, start=1)]
    test = [("", *records(members[CIFAR_TEST], CIFAR_TEST, archive, len(classes)))]
    del members
    return {"train": write_split(out / "train", classes, train), "test": write_split(out / "test", classes, test)}


CONVERTERS = {"cifar10": convert_cifar10}


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in CONVERTERS:
        raise UserError(f"usage: python -m gn_diffusion.convert {'|'.join(CONVERTERS)} ARCHIVE OUT "
                        f"(got {' '.join(argv) or 'no arguments'}).")
    kind, archive, out = argv
    counts = CONVERTERS[kind](archive, out)
    print(", ".join(f"{out}/{split}: {n} images" for split, n in counts.items()))


main.__doc__ = __doc__  # --help prints the module's usage

if __name__ == "__main__":
    run_cli(main)
