"""The offline sample metric: its numerics, its cache, and that it orders image sets as it should."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import shared_classifier_cache
from gn_diffusion.config import Config, EvalConfig, RuntimeConfig
from gn_diffusion.data.dataset import digits_arrays
from gn_diffusion.errors import ConfigError, UserError
from gn_diffusion.evaluate.classifier import ClassifierRecipe
from gn_diffusion.evaluate.command import evaluation_config
from gn_diffusion.evaluate.digits import digits_classifier
from gn_diffusion.evaluate.metric import Evaluator, digits_evaluator
from gn_diffusion.evaluate.scores import (class_counts, class_coverage, frechet_distance, kernel_inception_distance,
                                          kl_from_uniform)

SIZE = 8  # the digits' native resolution: the fastest classifier to train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return shared_classifier_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def evaluator(cache):
    return digits_evaluator(SIZE, EvalConfig(cache_dir=str(cache), kid_subsets=50))


@pytest.fixture(scope="module")
def train_split():
    return digits_arrays("train", SIZE)


def test_frechet_distance_matches_the_sqrtm_formula_and_an_exact_case():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a + cov_b)
                - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    # b = 2a + 3: covariance 4S, so FD = |mean shift|^2 + tr(S) + 4 tr(S) - 2 tr(2S) exactly.
    shifted = 2 * a + 3
    exact = np.sum((a.mean(0) + 3) ** 2) + np.trace(cov_a)
    assert frechet_distance(a, shifted) == pytest.approx(exact, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.normal(size=(50, 3)), np.zeros((50, 61))], axis=1)  # 64-d, rank 3
    fd = frechet_distance(a, a + 1.0)
    assert math.isfinite(fd) and fd == pytest.approx(64.0, rel=1e-6)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_across_two():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    same, same_std = kernel_inception_distance(a, b, subsets=100, subset_size=100)
    apart, _ = kernel_inception_distance(a, b + 0.5, subsets=100, subset_size=100)
    assert abs(same) < 3 * same_std / math.sqrt(100) + 1e-3
    assert apart > 20 * abs(same) and apart > 0


def test_class_statistics():
    assert kl_from_uniform(class_counts(np.zeros(50, int), 10)) == pytest.approx(math.log(10))
    assert kl_from_uniform(class_counts(np.arange(100) % 10, 10)) == pytest.approx(0.0, abs=1e-12)
    assert kl_from_uniform(class_counts(np.arange(100) % 5, 10)) == pytest.approx(math.log(2))
    # 100 images, 10 classes, share 0.25: a class needs >= 2.5 predictions to count as covered.
    counts = np.array([30, 30, 30, 5, 2, 1, 1, 1, 0, 0])
    assert class_coverage(counts, share=0.25) == pytest.approx(0.4)
    assert class_coverage(counts, share=0.01) == pytest.approx(0.8)  # at least one prediction


def test_digits_classifier_is_accurate_and_cached(cache):
    classifier = digits_classifier(SIZE, cache)
    assert classifier.held_out_accuracy > 0.95
    (path,) = cache.glob(f"digits_cnn-{SIZE}px-*.safetensors")
    stamp = path.stat().st_mtime_ns
    again = digits_classifier(SIZE, cache)
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained
    images, _ = digits_arrays("test", SIZE)
    assert torch.equal(again(images), classifier(images))


def test_truncated_cache_file_is_retrained(tmp_path):
    quick = ClassifierRecipe(epochs=3)  # the cache logic, not the accuracy, is under test here
    digits_classifier(SIZE, tmp_path / "first", quick)
    (source,) = (tmp_path / "first").glob(f"digits_cnn-{SIZE}px-*.safetensors")
    broken = tmp_path / source.name
    broken.write_bytes(source.read_bytes()[:100])
    classifier = digits_classifier(SIZE, tmp_path, quick)
    assert classifier.held_out_accuracy > 0.9
    assert broken.stat().st_size == source.stat().st_size


def test_metric_orders_real_noisy_and_half_class_digits(evaluator, train_split):
    images, labels = train_split
    real = images[:297]
    g = torch.Generator().manual_seed(0)
    noisy = [(real + s * torch.randn(real.shape, generator=g)).clamp(-1, 1) for s in (0.25, 0.5)]
    half = images[labels < 5][:297]  # a "model" that only draws digits 0-4
    s_real, s_light, s_heavy, s_half = (evaluator.score(x) for x in (real, *noisy, half))
    assert s_real.frechet < s_light.frechet < s_heavy.frechet
    assert s_half.frechet > 3 * s_real.frechet
    assert s_real.kid < s_light.kid < s_heavy.kid and s_real.kid < s_half.kid
    assert abs(s_real.kid) < 0.1 * s_half.kid  # real vs real: KID near 0
    assert s_real.coverage == 1.0 and s_half.coverage == 0.5
    assert s_real.kl_uniform < 0.05 and s_half.kl_uniform == pytest.approx(math.log(2), abs=0.05)


def test_report_puts_the_floor_of_the_same_count_beside_each_score(evaluator, train_split):
    images, labels = train_split
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    report = evaluator.report(images[:200], shuffled[:200])  # right images, wrong requested classes
    assert report.floor.num_images == report.samples.num_images == 200
    assert report.floor.accuracy > 0.95 and report.samples.accuracy < 0.3
    assert set(report.samples.class_accuracy) == set(range(10))
    text = report.format()
    fd_line = next(line for line in text.splitlines() if line.startswith("Frechet distance "))
    assert fd_line.split()[-2:] == [f"{report.samples.frechet:.3f}", f"{report.floor.frechet:.3f}"]
    assert "floor" in text and f"{report.frechet_ratio:.2f}x the floor" in text
    std_line = next(line for line in text.splitlines() if line.strip().startswith("std over KID subsets"))
    assert std_line.split()[-2:] == [f"{1e3 * report.samples.kid_std:.1f}", f"{1e3 * report.floor.kid_std:.1f}"]


def test_a_plain_callable_plugs_in_as_the_feature_extractor(train_split):
    images, _ = train_split
    reference, _ = digits_arrays("test", SIZE)
    pixels = Evaluator(lambda x: x.flatten(1), reference, images, settings=EvalConfig(kid_subsets=10))
    report = pixels.report(images[:100])
    assert report.samples.coverage is None and report.samples.kl_uniform is None  # no classifier
    assert report.samples.frechet > 0 and report.floor.num_images == 100
    assert "class coverage" not in report.format()
    assert pixels.score(-images[:100]).frechet > 2 * report.samples.frechet  # inverted digits


def test_eval_overrides_are_typed_and_checked():
    trained = Config(runtime=RuntimeConfig(backend="triton", cpu_threads=4))
    cfg = evaluation_config(trained, ["eval.num_images=64", "sample.seed=3", "runtime.cpu=true"])
    assert cfg.eval.num_images == 64 and cfg.sample.seed == 3 and cfg.model == trained.model
    # The run's runtime said how it ran where it trained; here the defaults and the overrides apply.
    assert cfg.runtime == RuntimeConfig(cpu=True)
    for bad in (["model.norm=batch"], ["eval.num_sample=3"], ["eval.coverage_share=2"], ["eval.extractor=nocolon"],
                ["eval.kid_subsets=1"], ["eval.coverage_share=nan"], ["runtime.backend=cuda"]):
        with pytest.raises(ConfigError):
            evaluation_config(Config(), bad)


TINY_UNET = [f"model.image_size={SIZE}", "model.base_channels=8", "model.channel_mult=[1]",
             "model.num_res_blocks=1", "model.attention_resolutions=[]", "model.groups=4"]


def export_untrained(run, overrides=()):
    """An untrained tiny U-Net exported the way training exports its EMA model."""
    from gn_diffusion.config import load_config
    from gn_diffusion.model.unet import build_unet
    from gn_diffusion.sample.model_folder import export_model

    cfg = load_config(None, [*TINY_UNET, *overrides])
    torch.manual_seed(0)
    export_model(build_unet(cfg.model).eval(), cfg, run / "model")
    return run


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    return export_untrained(tmp_path_factory.mktemp("run"))


@pytest.fixture
def pixel_features(tmp_path, monkeypatch):
    """A user's extractor module: raw pixels (the first image_size x in_channels of them)."""
    (tmp_path / "my_features.py").write_text(
        "def pixels(image_size, in_channels):\n"
        "    return lambda images: images.flatten(1)[:, : image_size * in_channels]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_features:pixels"


def test_evaluate_command_scores_an_exported_model_beside_its_floor(exported_run, cache, capsys):
    from gn_diffusion.evaluate.command import main

    main([str(exported_run), "eval.num_images=40", "eval.kid_subsets=5", f"eval.cache_dir={cache}",
          "sample.num_inference_steps=2"])
    printed = capsys.readouterr().out
    saved = json.loads((exported_run / "evaluation.json").read_text())
    assert saved["samples"]["num_images"] == saved["floor"]["num_images"] == 40
    # An untrained network is far from real digits; the floor is real digits.
    assert saved["samples"]["frechet"] > 3 * saved["floor"]["frechet"]
    assert f"{saved['samples']['frechet']:.3f}" in printed and f"{saved['floor']['frechet']:.3f}" in printed


def test_a_run_trained_with_triton_kernels_evaluates_on_the_cpu(tmp_path, pixel_features):
    from gn_diffusion.evaluate.command import main

    run = export_untrained(tmp_path / "run", ["runtime.backend=triton"])
    main([str(run), f"eval.extractor={pixel_features}", "eval.num_images=8", "eval.kid_subsets=2",
          "sample.num_inference_steps=1", "runtime.cpu_threads=1"])
    assert json.loads((run / "evaluation.json").read_text())["samples"]["num_images"] == 8


def test_evaluate_command_takes_a_plugged_extractor(exported_run, pixel_features, capsys):
    from gn_diffusion.evaluate.command import main

    main([str(exported_run), f"eval.extractor={pixel_features}", "eval.num_images=20", "eval.kid_subsets=5",
          "sample.num_inference_steps=2"])
    printed = capsys.readouterr().out
    assert f"features: {pixel_features}" in printed and "class coverage" not in printed
    saved = json.loads((exported_run / "evaluation.json").read_text())
    assert saved["samples"]["coverage"] is None and saved["floor"]["num_images"] == 20


def test_evaluate_command_scores_an_image_folder_model_against_held_out_images(tmp_path, pixel_features):
    from PIL import Image

    from gn_diffusion.evaluate.command import main

    images, _ = digits_arrays("all", SIZE)
    pixels = ((images[:, 0] + 1) * 127.5).round().byte().numpy()
    for folder, part in (("train", pixels[:30]), ("held_out", pixels[30:60])):
        (tmp_path / folder).mkdir()
        for i, array in enumerate(part):
            Image.fromarray(array).save(tmp_path / folder / f"{i}.png")
    run = export_untrained(tmp_path / "run", ["data.dataset=image_folder", f"data.path={tmp_path / 'train'}"])
    with pytest.raises(UserError, match="eval.reference_dir"):  # the digits classifier does not apply
        main([str(run), "eval.num_images=20"])
    main([str(run), f"eval.extractor={pixel_features}", f"eval.reference_dir={tmp_path / 'held_out'}",
          "eval.num_images=20", "eval.kid_subsets=5", "sample.num_inference_steps=2"])
    saved = json.loads((run / "evaluation.json").read_text())
    assert saved["floor"]["num_images"] == 20 and saved["samples"]["frechet"] > saved["floor"]["frechet"]


def test_evaluate_command_rejects_bad_input_with_one_sentence(tmp_path, capsys):
    from gn_diffusion.cli import run_cli
    from gn_diffusion.evaluate.command import main

    for argv in ([str(tmp_path / "missing")], [str(tmp_path), "model.norm=batch"], []):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main, argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
