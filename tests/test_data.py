"""Datasets: the digits, and a folder of images with labels from sub-folders."""

import pytest
import torch
from PIL import Image

from gn_diffusion.data.dataset import build_dataset, image_folder_arrays
from gn_diffusion.errors import UserError
from conftest import tiny_config


def test_digits_dataset_keeps_labels_and_range(tmp_path):
    dataset = build_dataset(tiny_config(tmp_path, "model.image_size=16"))
    assert len(dataset) == 1500 and set(dataset.labels.tolist()) == set(range(10))
    item = dataset[0]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    assert set(labels.tolist()) == set(range(10))
    assert dataset.images.min() == -1 and dataset.images.max() == 1


def make_folder(root):
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "deep").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(root / "cats" / "a.png")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(root / "cats" / "b.jpg")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(root / "dogs" / "deep" / "c.webp")
    (root / "dogs" / "broken.png").write_bytes(b"not a png")
    (root / "dogs" / "notes.txt").write_text("ignored")


def test_image_folder_reads_recursively_skips_unreadable_and_labels_by_subfolder(tmp_path):
    make_folder(tmp_path)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image file"):
        images, labels, classes = image_folder_arrays(tmp_path, 8, 3, class_labels=True)
    assert classes == ["cats", "dogs"]
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1]
    assert images[0, 0].float().mean() > 250 and images[2, 2].float().mean() > 250  # red png, blue webp


def test_image_folder_dataset_resizes_center_crops_and_checks_classes(tmp_path):
    make_folder(tmp_path / "data")
    Image.new("L", (12, 4), 0).save(tmp_path / "data" / "cats" / "wide.png")  # 12x4 -> 24x8 -> crop 8x8
    cfg = tiny_config(tmp_path / "run", "data.dataset=image_folder", f"data.path={tmp_path / 'data'}",
                      "model.in_channels=3", "data.class_labels=true", "model.num_classes=2")
    with pytest.warns(UserWarning):
        dataset = build_dataset(cfg)  # model.num_classes=2: the two sub-folders, or a UserError
    assert len(dataset) == 4 and set(dataset.labels.tolist()) == {0, 1}
    assert dataset[0]["image"].shape == (3, 8, 8) and dataset[0]["image"].min() >= -1
    wrong = tiny_config(tmp_path / "run", "data.dataset=image_folder", f"data.path={tmp_path / 'data'}",
                        "model.in_channels=3", "data.class_labels=true", "model.num_classes=5")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="model.num_classes=2"):
        build_dataset(wrong)


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_folder_without_readable_images_is_an_error(tmp_path, case):
    folder = tmp_path / "images"
    if case != "missing":
        folder.mkdir()
    if case == "unreadable":
        (folder / "x.png").write_bytes(b"junk")
    message = {"missing": "does not exist", "empty": "holds no", "unreadable": "none of the 1 image files"}[case]
    with pytest.raises(UserError, match=message):
        image_folder_arrays(folder, 8, 1, class_labels=False)
