"""python -m gn_diffusion.data.convert cifar10 ARCHIVE OUT: the image folders it writes, and the archives
it refuses in one sentence (damaged, inflating past CIFAR-10's sizes, class names that cannot be
folders). Every archive here is built by the test, with 3 records a batch instead of 10,000."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from gn_diffusion.data import convert
from gn_diffusion.data.dataset import build_dataset
from conftest import assert_fails_cleanly, tiny_config

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECORDS = 3


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    """Batches of RECORDS records: the converter checks every batch holds exactly that many."""
    monkeypatch.setattr(convert, "CIFAR_BATCH_RECORDS", RECORDS)


def cifar_records(labels, seed):
    """CIFAR-10 binary records: a label byte, then the R, G and B 32x32 planes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    data = b"".join(bytes([label]) + plane.tobytes() for label, plane in zip(labels, pixels))
    return data, pixels


def cifar_archive(path, skip=(), damage=None, classes=CLASSES, bomb=None):
    """A small cifar-10-binary.tar.gz: RECORDS records a batch, every class among the training
    ones. `damage` maps members to a change of their bytes; `bomb` = (member, size) ends the
    archive with that member's header giving `size` and a few bytes of data, as a stream that
    would inflate past it does when it is cut short."""
    members, truth = {"batches.meta.txt": ("\n".join(classes) + "\n\n").encode()}, {}
    for k in range(1, 6):
        members[f"data_batch_{k}.bin"], truth[k] = cifar_records([k, k + 1, (k + 5) % 10], seed=k)
    members["test_batch.bin"], truth["test"] = cifar_records([9, 3, 3], seed=9)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            if name in skip:
                continue
            data = (damage or {}).get(name, bytes)(data)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            if bomb and bomb[0] == name:
                info.size = bomb[1]
                tar.fileobj.write(info.tobuf() + data[:16])  # addfile would write all `size` bytes
                break
            tar.addfile(info, io.BytesIO(data))
    return path, truth


def test_convert_writes_the_cifar10_folders_the_config_reads(tmp_path, capsys):
    archive, truth = cifar_archive(tmp_path / "cifar-10-binary.tar.gz")
    convert.main(["cifar10", str(archive), str(tmp_path / "out")])
    assert "out/train: 15 images" in capsys.readouterr().out
    train_dir, test_dir = tmp_path / "out" / "train", tmp_path / "out" / "test"
    assert sorted(p.name for p in train_dir.iterdir()) == CLASSES
    assert sorted(p.name for p in (train_dir / "bird").iterdir()) == ["1-00001.png", "2-00000.png"]
    assert sorted(p.name for p in (test_dir / "cat").iterdir()) == ["00001.png", "00002.png"]
    image = np.asarray(Image.open(train_dir / "bird" / "1-00001.png"))
    assert np.array_equal(image, truth[1][1].transpose(1, 2, 0))  # planar RGB -> HWC, exactly
    cfg = tiny_config(tmp_path / "run", "data.dataset=image_folder", f"data.path={train_dir}", "model.image_size=32",
                      "model.in_channels=3", "data.class_labels=true", "model.num_classes=10")
    dataset = build_dataset(cfg)  # model.num_classes=10: the ten class folders, or a UserError
    assert len(dataset) == 15
    batch = dataset.__getitems__(range(15))
    first_bird = [i for i in range(15) if batch["label"][i] == 2][0]
    assert torch.equal(batch["image"][first_bird], torch.from_numpy(truth[1][1]))  # 32x32: no resampling


BATCH_BYTES = RECORDS * 3073


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_an_archive", "is not a readable .tar.gz archive"),
    ("no_test_batch", "lacks test_batch.bin"),
    ("truncated_batch", f"data_batch_3.bin in {{archive}} holds {BATCH_BYTES - 5} bytes where CIFAR-10's holds "
                        f"{BATCH_BYTES}; the archive is damaged"),
    ("taken", "out/train already exists"),
])
def test_convert_refuses_a_bad_archive_in_one_sentence(tmp_path, capsys, case, message):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    if case == "not_an_archive":
        archive.write_bytes(b"\x1f\x8b not really gzip")
    elif case != "missing":
        cifar_archive(archive, skip={"no_test_batch": ("test_batch.bin",)}.get(case, ()),
                      damage={"data_batch_3.bin": lambda data: data[:-5]} if case == "truncated_batch" else None)
    if case == "taken":
        (tmp_path / "out" / "train").mkdir(parents=True)
    assert_refused(capsys, archive, tmp_path, message.format(archive=archive))


def assert_refused(capsys, archive, tmp_path, message):
    """convert refuses `archive` with `message`, every file kept and no split written."""
    assert_fails_cleanly(capsys, convert.main, ["cifar10", str(archive), str(tmp_path / "out")], message, tmp_path)
    assert not (tmp_path / "out" / "test").exists()


def test_a_batch_of_another_record_count_is_refused(tmp_path, capsys):
    archive, _ = cifar_archive(tmp_path / "cifar-10-binary.tar.gz",
                               damage={"test_batch.bin": lambda data: data + data[:3073]})  # a record too many
    assert_refused(capsys, archive, tmp_path, f"test_batch.bin in {archive} holds {BATCH_BYTES + 3073} bytes where "
                                      f"CIFAR-10's holds {BATCH_BYTES};")


@pytest.mark.parametrize("member, size, want", [
    ("data_batch_1.bin", 2_150_000_000, str(BATCH_BYTES)),  # a 2 GB bomb: refused from its header, unread
    ("batches.meta.txt", 5000, "at most 4096"),
])
def test_a_member_larger_than_cifar10s_is_refused_unread(tmp_path, capsys, member, size, want):
    archive, _ = cifar_archive(tmp_path / "cifar-10-binary.tar.gz", bomb=(member, size))
    assert_refused(capsys, archive, tmp_path, f"{member} in {archive} holds {size} bytes where CIFAR-10's holds {want};")


@pytest.mark.parametrize("bad, shown", [
    ("ca\x00t", r"'ca\x00t'"), ("..", "'..'"), ("/", "'/'"), ("cats/dogs", "'cats/dogs'"), ("a\\b", r"'a\\b'"),
    ("x" * 300, "'" + "x" * 100 + "'"), ("tab\there", r"'tab\there'"),
])
def test_a_class_name_that_cannot_be_a_folder_is_refused_by_its_line(tmp_path, capsys, bad, shown):
    archive, _ = cifar_archive(tmp_path / "cifar-10-binary.tar.gz", classes=[*CLASSES[:3], bad, *CLASSES[4:]])
    assert_refused(capsys, archive, tmp_path, f"batches.meta.txt:4 in {archive} names the class {shown}, which cannot be "
                                      "a folder name")


def test_class_names_differing_only_in_case_are_refused(tmp_path, capsys):
    archive, _ = cifar_archive(tmp_path / "cifar-10-binary.tar.gz", classes=[*CLASSES[:9], "AIRPLANE"])
    assert_refused(capsys, archive, tmp_path, "should name 10 distinct classes")
