"""Lazy data sources: a Hugging Face `datasets` split and an image folder, decoded as they are
fetched; exact resume and per-rank slicing on both; and random crops from the step's draws.
Every data set here is built by the test (nothing is downloaded)."""

import io

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import gn_diffusion.data.hf_source as hf_source
import gn_diffusion.data.sources as sources
from gn_diffusion.data.dataset import build_dataset, collate_batch, folder_source
from gn_diffusion.diffusion.draws import draw_step, random_crop
from gn_diffusion.diffusion.seeding import seeded_generator
from gn_diffusion.errors import ConfigError
from gn_diffusion.errors import UserError
from gn_diffusion.evaluate.metric import evaluator_for
from gn_diffusion.sample.generate import generate
from gn_diffusion.sample.model_folder import load_model
from gn_diffusion.train.loop import EpochBatches, train
from conftest import assert_fails_cleanly, tiny_config
from test_resume import STRESS, assert_identical, checkpoint_state

import datasets  # noqa: E402  (a core dependency)

RGB = ["model.in_channels=3"]


def png_bytes(value: int, size=(10, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_hf(path, train_rows=24, test_rows=6, blank=()):
    """A DatasetDict on disk: 'train' and 'test' splits of PNGs (rows in `blank` have no image)
    with a ClassLabel column and an unrelated text column first."""
    features = datasets.Features({"note": datasets.Value("string"), "picture": datasets.Image(),
                                  "kind": datasets.ClassLabel(names=["a", "b", "c"])})

    def split(n, offset):
        pictures = [None if i in blank else {"bytes": png_bytes(10 * i + offset), "path": None} for i in range(n)]
        return datasets.Dataset.from_dict({"note": [f"row {i}" for i in range(n)], "picture": pictures,
                                           "kind": [i % 3 for i in range(n)]}, features=features)

    datasets.DatasetDict({"train": split(train_rows, 0), "test": split(test_rows, 3)}).save_to_disk(str(path))
    return path


def hf_config(tmp_path, *overrides):
    return tiny_config(tmp_path / "run", "data.dataset=hf", f"data.path={tmp_path / 'hf'}", *RGB, *overrides)


def test_hf_source_finds_its_columns_skips_empty_rows_and_decodes_when_fetched(tmp_path, monkeypatch):
    save_hf(tmp_path / "hf", blank=(3,))
    decoded = []
    real = sources.read_image
    for module in (sources, hf_source):
        monkeypatch.setattr(module, "read_image", lambda *a: decoded.append(1) or real(*a))
    with pytest.warns(UserWarning, match="skipped 1 row"):
        dataset = build_dataset(hf_config(tmp_path, "model.num_classes=3"))  # the ClassLabel's 3 names
    assert len(dataset) == 23 and len(decoded) == 1  # checked: the first row decoded, once
    batch = dataset.__getitems__([0, 3, 5])  # row 3 was blank: item 3 is row 4
    assert batch["image"].shape == (3, 3, 8, 8) and batch["image"].dtype == torch.uint8
    assert batch["label"].tolist() == [0, 1, 0] and len(decoded) == 4
    assert batch["image"][1, 0].float().mean() == pytest.approx(40, abs=1)  # row 4: red = 10 * 4
    item = dataset[0]
    assert item["image"].dtype == torch.float32 and -1 <= item["image"].min() and item["image"].max() <= 1
    with pytest.warns(UserWarning):
        unlabelled = build_dataset(hf_config(tmp_path))
    assert set(unlabelled.labels.tolist()) == {-1}


@pytest.mark.parametrize("override, message", [
    ("data.image_column=kind", "data.image_column=kind of"),
    ("data.image_column=nope", "is not a column of"),
    ("data.label_column=note", "is not a ClassLabel or integer column"),
    ("data.split=validation", "has no split 'validation' (its splits: train, test)"),
    ("model.num_classes=5", "set model.num_classes=3"),
])
def test_hf_settings_that_do_not_fit_the_data_set_are_one_sentence(tmp_path, override, message):
    save_hf(tmp_path / "hf")
    labels = ["model.num_classes=3"] if "label" in override else []
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_dataset(hf_config(tmp_path, *labels, override))


def test_hf_needs_a_path_and_a_data_set_with_images(tmp_path, capsys):
    with pytest.raises(ConfigError, match="data.path"):
        tiny_config(tmp_path, "data.dataset=hf", *RGB)
    datasets.Dataset.from_dict({"x": [1, 2]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"has no Image column \(its columns: x \(Value\)\)"):
        build_dataset(hf_config(tmp_path))
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # save_to_disk's progress bar
    assert_fails_cleanly(capsys, "train.py", ["data.dataset=hf", f"data.path={tmp_path / 'empty'}", *RGB,
                                              f"train.output_dir={tmp_path / 'run'}"],
                         "cannot read the data set", tmp_path)


def test_an_item_damaged_after_the_check_is_replaced_by_the_next_with_a_warning(tmp_path):
    for name, value in (("a", 0), ("b", 100), ("c", 200)):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.new("L", (8, 8), value).save(tmp_path / "data" / name / "x.png")
    source, classes = folder_source(tmp_path / "data", 8, 1, class_labels=True)
    assert classes == ["a", "b", "c"] and source.files.dtype.kind == "S"  # paths as one byte array
    (tmp_path / "data" / "b" / "x.png").write_bytes(b"\x89PNG damaged since")
    with pytest.warns(UserWarning, match=r"could not decode .*b/x.png .*the next image is used"):
        batch = source.__getitems__([0, 1])
    assert batch["label"].tolist() == [0, 2] and batch["image"][1].float().mean() == 200


def rank_batches(dataset, batch_size, world, rank, num_workers=0, count=3):
    loader = DataLoader(dataset, batch_sampler=EpochBatches(len(dataset), batch_size, world, rank, seed=5),
                        collate_fn=collate_batch, num_workers=num_workers)
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("kind", ["hf", "image_folder"])
def test_each_rank_fetches_its_own_slice_of_every_global_batch(tmp_path, kind):
    if kind == "hf":
        cfg = hf_config(tmp_path / "d", "model.num_classes=3")
        save_hf(tmp_path / "d" / "hf")
    else:
        make_class_folders(tmp_path / "d" / "images", per_class=8)
        cfg = tiny_config(tmp_path / "run", "data.dataset=image_folder", f"data.path={tmp_path / 'd' / 'images'}",
                          *RGB, "data.class_labels=true", "model.num_classes=3")
    dataset = build_dataset(cfg)
    whole = rank_batches(dataset, 8, 1, 0)
    ranks = [rank_batches(dataset, 4, 2, r, num_workers=r) for r in (0, 1)]  # rank 1 decodes in a worker
    for b, batch in enumerate(whole):
        for key in ("image", "label"):
            assert torch.equal(batch[key], torch.cat([ranks[0][b][key], ranks[1][b][key]]))


def make_class_folders(root, per_class=8):
    for c, name in enumerate(("ant", "bee", "cow")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 9), (30 * i, 80 * c, 5)).save(root / name / f"{i}.png")


def resume_matches(cfg_of):
    """Train 4 steps in one go and 2 + 2 with a resume: the step-4 checkpoints are identical."""
    train(cfg_of("full", "train.max_steps=4"), progress=False)
    train(cfg_of("split", "train.max_steps=2"), progress=False)
    train(cfg_of("split", "train.max_steps=4", "train.resume=auto"), progress=False)


def test_hf_run_resumes_exactly_with_random_crops_and_samples(tmp_path):
    save_hf(tmp_path / "hf")
    out = tmp_path / "runs"

    def cfg_of(name, *extra):
        return tiny_config(out / name, *STRESS, "model.num_classes=3", "data.dataset=hf",
                           f"data.path={tmp_path / 'hf'}", *RGB, "data.random_crop=2", *extra)

    resume_matches(cfg_of)
    assert_identical(checkpoint_state(out / "full", 4), checkpoint_state(out / "split", 4))
    model, cfg = load_model(out / "split")
    images, labels = generate(model, cfg, progress=False)
    assert images.shape == (4, 3, 8, 8) and torch.isfinite(images).all()
    assert (out / "split" / "samples" / "final.png").is_file()


def test_lazy_folder_run_resumes_exactly_decoding_in_a_worker(tmp_path):
    make_class_folders(tmp_path / "images")
    out = tmp_path / "runs"

    def cfg_of(name, *extra):
        return tiny_config(out / name, *STRESS, "model.num_classes=3", "data.dataset=image_folder",
                           f"data.path={tmp_path / 'images'}", "data.class_labels=true", *RGB,
                           "data.num_workers=1", *extra)

    resume_matches(cfg_of)
    assert_identical(checkpoint_state(out / "full", 4), checkpoint_state(out / "split", 4))


def test_hf_model_is_scored_against_its_held_out_split(tmp_path, monkeypatch):
    save_hf(tmp_path / "hf")
    (tmp_path / "pixels.py").write_text("def make(image_size, in_channels):\n"
                                        "    return lambda images: images.mean(dim=(2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="eval.reference_split=SPLIT"):
        evaluator_for(hf_config(tmp_path, "eval.extractor=pixels:make"))
    evaluator = evaluator_for(hf_config(tmp_path, "eval.extractor=pixels:make", "eval.reference_split=test",
                                        "eval.kid_subsets=2", "eval.kid_subset_size=4"))
    assert evaluator.reference_features.shape == (6, 3) and len(evaluator.floor_images) == 24
    report = evaluator.report(torch.zeros(8, 3, 8, 8).uniform_(-1, 1))
    assert report.floor.num_images == 8 and report.samples.frechet > report.floor.frechet


def test_random_crop_shifts_each_image_by_its_drawn_offset_with_mirrored_borders():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    offsets = torch.tensor([[1, 1], [0, 2]])  # pad 1: (1, 1) is no shift; (0, 2) is up one, left one
    out = random_crop(images, offsets, pad=1)
    assert torch.equal(out[0], images[0])
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    assert torch.equal(out[1], padded[1, :, 0:4, 2:6])
    assert torch.equal(out[1, 0, 0], images[1, 0, 1, [1, 2, 3, 2]])  # the top row mirrors row 1
    base = draw_step(images, 100, 0.1, seeded_generator(3, 4))
    cropped = draw_step(images, 100, 0.1, seeded_generator(3, 4), crop_pad=2)
    assert base.crop is None and cropped.crop.shape == (2, 2) and 0 <= cropped.crop.min() <= cropped.crop.max() <= 4
    for name in ("timesteps", "noise", "flip", "drop"):  # crops are drawn last: the rest is unchanged
        assert torch.equal(getattr(base, name), getattr(cropped, name))
    explained = torch._dynamo.explain(random_crop)(images, offsets, 1)  # the compiled step keeps one graph
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    with pytest.raises(ConfigError, match="data.random_crop"):
        tiny_config("unused", "data.random_crop=8")
