"""eval.extractor=classifier: the package's CNN trained on a run's own labelled data, scoring
samples beside the real-data floor; the digits metric is the same code on the digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY, shared_classifier_cache
from gn_diffusion.config import load_config
from gn_diffusion.errors import ConfigError, UserError
from gn_diffusion.evaluate.classifier import ClassifierRecipe, recipe_for
from gn_diffusion.evaluate.metric import digits_evaluator, evaluator_for

SIZE = 8


def write_class_folders(root, per_class: int, seed: int, classes=("across", "down")):
    """Grey 8x8 ramps, left-to-right for one class and top-to-bottom for the other, with noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, SIZE)
    for name, base in zip(classes, (np.tile(ramp, (SIZE, 1)), np.tile(ramp[:, None], (1, SIZE)))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i}.png")
    return root


def labelled_config(tmp_path, train, reference, *overrides):
    return load_config(ROOT / "configs" / "digits.yaml", [
        *TINY, f"train.output_dir={tmp_path / 'run'}", "data.dataset=image_folder", f"data.path={train}",
        "data.class_labels=true", "model.in_channels=1", "eval.extractor=classifier", f"eval.reference_dir={reference}",
        f"eval.cache_dir={tmp_path / 'cache'}", "eval.kid_subsets=10", *overrides])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("labelled")
    return base, write_class_folders(base / "train", 40, seed=0), write_class_folders(base / "held_out", 15, seed=1)


def test_classifier_floor_of_real_images_is_below_noise_and_the_cnn_is_cached(folders):
    base, train, reference = folders
    cfg = labelled_config(base, train, reference)
    evaluator = evaluator_for(cfg)
    assert evaluator.classifies and evaluator.extractor.num_classes == 2
    assert evaluator.extractor.held_out_accuracy > 0.9  # the ramps' direction is easy to tell
    noise = torch.rand(30, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report = evaluator.report(noise)
    assert report.floor.frechet < report.samples.frechet and report.floor.kid < report.samples.kid
    assert report.floor.coverage == 1.0 and report.classifier_accuracy == evaluator.extractor.held_out_accuracy
    assert "held-out accuracy" in report.format() and "classifier" in report.format()
    pick = torch.arange(0, 80, 3)  # both classes (the folders are read class by class)
    real, labels = evaluator.floor_images[pick], evaluator.floor_labels[pick]
    conditional = evaluator.report(real, requested=labels)  # a class-conditional model's per-class accuracy
    assert set(conditional.samples.class_accuracy) == {0, 1} and conditional.samples.accuracy > 0.9
    (cached,) = (base / "cache").glob(f"classifier_cnn-{SIZE}px-*.safetensors")
    stamp = cached.stat().st_mtime_ns
    again = evaluator_for(cfg)
    assert cached.stat().st_mtime_ns == stamp  # loaded, not retrained
    assert torch.equal(again.extractor(noise), evaluator.extractor(noise))


def test_held_out_classes_the_training_data_lacks_are_refused(folders, tmp_path):
    base, train, _ = folders
    odd = write_class_folders(tmp_path / "odd", 2, seed=2, classes=("across", "sideways"))
    with pytest.raises(UserError, match="sideways"):
        evaluator_for(labelled_config(tmp_path, train, odd))


def test_unlabelled_folder_is_sent_to_inception_or_a_factory(folders):
    base, train, reference = folders
    with pytest.raises(ConfigError, match="eval.extractor=inception or a module:factory"):
        labelled_config(base, train, reference, "data.class_labels=false")


def test_the_digits_metric_is_the_classifier_metric_on_the_digits(tmp_path_factory):
    cache = str(shared_classifier_cache(tmp_path_factory))
    cfg = load_config(ROOT / "configs" / "digits.yaml", [*TINY, "eval.extractor=classifier", f"eval.cache_dir={cache}"])
    via_config = evaluator_for(cfg)
    default = digits_evaluator(SIZE, cfg.eval)
    assert via_config.name == default.name == "digits-cnn"
    assert via_config.extractor.held_out_accuracy == default.extractor.held_out_accuracy


def test_the_recipe_keeps_the_digits_epochs_and_bounds_large_data():
    assert recipe_for(1500) == ClassifierRecipe()  # the digits' 20 epochs: their cached CNN stays valid
    assert recipe_for(60_000).epochs * 60_000 <= 200_000  # minutes on one CPU thread
    assert recipe_for(10 ** 7).epochs == 1


def test_hf_data_trains_the_classifier_on_its_label_column(tmp_path):
    import datasets
    from test_data_sources import hf_config, save_hf

    save_hf(tmp_path / "hf")
    evaluator = evaluator_for(hf_config(tmp_path, "eval.extractor=classifier", "eval.reference_split=test",
                                        f"eval.cache_dir={tmp_path / 'cache'}", "eval.kid_subsets=2"))
    assert evaluator.extractor.num_classes == 3 and 0 <= evaluator.extractor.held_out_accuracy <= 1
    assert len(evaluator.reference_features) == 6 and len(evaluator.floor_images) == 24
    unlabelled = datasets.load_from_disk(str(tmp_path / "hf")).remove_columns("kind")
    unlabelled.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(UserError, match="no ClassLabel column.*eval.extractor=inception"):
        evaluator_for(hf_config(tmp_path, "eval.extractor=classifier", "eval.reference_split=test",
                                f"data.path={tmp_path / 'plain'}"))


def test_a_diverged_classifier_is_not_cached(tmp_path):
    from gn_diffusion.evaluate.classifier import trained_classifier

    images = torch.full((4, 1, SIZE, SIZE), float("nan"))
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(UserError, match="diverged"):
        trained_classifier((images, labels), (images, labels), 2, tmp_path, ClassifierRecipe(epochs=1))
    assert not list(tmp_path.glob("*.safetensors"))
