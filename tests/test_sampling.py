"""Sampling: per-image seeds make images independent of batch size and process count; the
schedulers, guidance, load_model and sample.py's files."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gn_diffusion.config import RuntimeConfig
from gn_diffusion.sample.command import sample_main
from gn_diffusion.sample.generate import generate
from gn_diffusion.sample.model_folder import export_model
from gn_diffusion.sample.model_folder import load_model

from conftest import in_each_process, launch_two_processes, random_model, tiny_config


@pytest.fixture
def exported(tmp_path):
    """An exported class-conditional model in <tmp>/run/model, sampling 8 images with ddpm."""
    cfg = tiny_config(tmp_path / "run", "model.num_classes=10", "sample.scheduler=ddpm", "sample.num_images=8",
                      "sample.num_inference_steps=4")
    export_model(random_model(cfg), cfg, tmp_path / "run" / "model")
    return tmp_path / "run"


def with_sample(cfg, **changes):
    return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **changes))


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm-solver++"])
def test_images_do_not_depend_on_batch_size(exported, scheduler):
    model, cfg = load_model(exported)
    cfg = with_sample(cfg, scheduler=scheduler, class_labels=[1, 2, 3], guidance_scale=2.0)
    one, labels = generate(model, with_sample(cfg, batch_size=1), progress=False)
    eight, _ = generate(model, with_sample(cfg, batch_size=8), progress=False)
    three, _ = generate(model, with_sample(cfg, batch_size=3), progress=False)
    assert one.shape == (8, 1, 8, 8) and one.dtype == torch.float32
    assert labels.tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    torch.testing.assert_close(one, eight, rtol=0, atol=1e-5)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-5)
    assert one.std() > 0.05 and not torch.allclose(one[0], one[3])  # real, distinct images
    other_seed, _ = generate(model, with_sample(cfg, seed=1), progress=False)
    assert not torch.allclose(one, other_seed)


def test_guidance_changes_conditional_images(exported):
    model, cfg = load_model(exported)
    cfg = with_sample(cfg, class_labels=[4])
    plain, _ = generate(model, cfg, progress=False)
    guided, _ = generate(model, with_sample(cfg, guidance_scale=3.0), progress=False)
    unconditional, labels = generate(model, with_sample(cfg, class_labels=None), progress=False)
    assert labels.tolist() == [-1] * 8
    assert not torch.allclose(plain, guided) and not torch.allclose(plain, unconditional)


def _sample_on_two_processes(run_dir: str):
    from accelerate import Accelerator

    in_each_process(run_dir)
    model, cfg = load_model(run_dir)
    accelerator = Accelerator(cpu=True)
    images, labels = generate(model, with_sample(cfg, num_images=7, batch_size=2), accelerator=accelerator)
    if accelerator.is_main_process:
        np.savez(Path(run_dir) / "two.npz", images=images.numpy(), labels=labels.numpy())


def test_images_do_not_depend_on_process_count(exported):
    launch_two_processes(_sample_on_two_processes, str(exported))
    assert (exported / "rank-0-ran").exists() and (exported / "rank-1-ran").exists()
    model, cfg = load_model(exported)
    one, _ = generate(model, with_sample(cfg, num_images=7, batch_size=5), progress=False)
    two = np.load(exported / "two.npz")
    assert two["images"].shape == (7, 1, 8, 8)
    np.testing.assert_allclose(two["images"], one.numpy(), rtol=0, atol=1e-5)


def test_load_model_from_run_or_model_dir_round_trips(exported):
    model, cfg = load_model(exported)
    same, cfg2 = load_model(exported / "model")
    trained = tiny_config(exported, "model.num_classes=10", "sample.scheduler=ddpm", "sample.num_images=8",
                          "sample.num_inference_steps=4")
    assert cfg == cfg2 == dataclasses.replace(trained, runtime=RuntimeConfig())  # runtime is this machine's
    expected = random_model(cfg).state_dict()
    for name, value in same.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert not model.training


def test_a_run_trained_with_triton_kernels_samples_on_a_cpu(tmp_path):
    """runtime.* says how the run executed where it trained; it does not follow the model."""
    cfg = tiny_config(tmp_path / "run", "runtime.backend=triton", "runtime.cpu=true")
    export_model(random_model(cfg), cfg, tmp_path / "run" / "model")
    model, loaded = load_model(tmp_path / "run")
    assert loaded.runtime == RuntimeConfig()
    out = sample_main(str(tmp_path / "run"), ["sample.num_images=2", "runtime.backend=torch"])
    assert (out / "grid.png").is_file()


def test_sample_main_writes_grid_pngs_and_npz(exported, tmp_path):
    out = sample_main(str(exported), ["sample.num_images=5", "sample.batch_size=2", "sample.class_labels=[7]",
                                      f"sample.output_dir={tmp_path / 'out'}"])
    assert out == tmp_path / "out"
    assert (out / "grid.png").is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (5, 8, 8, 1) and saved["images"].dtype == np.uint8
    assert saved["labels"].tolist() == [7] * 5
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "images" / "000003.png")), saved["images"][3, ..., 0])
