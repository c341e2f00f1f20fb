"""Exported models are diffusers pipeline folders: diffusers' own pipelines and GNPipeline
reproduce sample.py's images; older flat folders still load; the euler, heun and unipc samplers;
train.init_from's loader."""

import dataclasses
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DiffusionPipeline

from gn_diffusion.config import save_config
from gn_diffusion.diffusion.schedules import make_scheduler
from gn_diffusion.diffusion.seeding import seeded_generator
from gn_diffusion.errors import ConfigError, UserError
from gn_diffusion.model.unet import GNUNet, build_unet
from gn_diffusion.run_folder.layout import CHECKPOINT_MODEL_FILE, STATE_FILE, WEIGHTS_FILE
from gn_diffusion.run_folder.weights import init_weights_from
from gn_diffusion.sample.checks import check_sampling
from gn_diffusion.sample.command import sample_main
from gn_diffusion.sample.generate import generate
from gn_diffusion.sample.model_folder import export_model, load_model, model_dir
from gn_diffusion.sample.pipeline import OLD_UNET_MODULE, GNDDPMPipeline, GNPipeline, register_with_diffusers

from conftest import random_model, tiny_config

SEED = 5

register_with_diffusers()  # DiffusionPipeline.from_pretrained finds GNPipeline and GNDDPMPipeline


def load_pipeline(path, scheduler: str) -> GNPipeline:
    """A GNPipeline for a run or model folder, loaded through load_model's checks, with sample.py's
    scheduler `scheduler` built as make_scheduler builds it."""
    model, cfg = load_model(path)
    return GNPipeline(unet=model, scheduler=make_scheduler(cfg.diffusion, scheduler))


def with_sample(cfg, **changes):
    return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **changes))


def export_run(root: Path, *overrides) -> Path:
    cfg = tiny_config(root, *overrides)
    export_model(random_model(cfg), cfg, root / "model")
    return root


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    return export_run(tmp_path_factory.mktemp("uncond") / "run")


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    return export_run(tmp_path_factory.mktemp("cond") / "run", "model.num_classes=10")


@contextmanager
def pipeline_loader_warnings():
    """The records diffusers' pipeline loader logs (its loggers do not propagate to caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def sample_py_images(run: Path, out: Path, *overrides) -> np.ndarray:
    """sample.py's uint8 images [N, H, W, C] for the run, as written to samples.npz."""
    sample_main(str(run), [f"sample.output_dir={out}", f"sample.seed={SEED}", *overrides])
    return np.load(out / "samples.npz")["images"]


def test_the_model_folder_is_a_diffusers_pipeline_folder(unconditional, conditional):
    folder = unconditional / "model"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [
        "config.yaml", "model_index.json", "scheduler", "scheduler/scheduler_config.json",
        "unet", "unet/config.json", f"unet/{WEIGHTS_FILE}"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["gn_diffusion.model.unet", "GNUNet"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["_class_name"] == "GNDDPMPipeline"
    assert json.loads((conditional / "model" / "model_index.json").read_text())["_class_name"] == "GNPipeline"
    assert not list(folder.parent.glob(".tmp-*")) and not list(folder.parent.glob(".old-*"))


def test_an_export_whose_config_has_retired_keys_still_loads(conditional, tmp_path):
    """Exports made before the EMA was a half-life in images saved train.ema_decay."""
    old = tmp_path / "old-model"
    shutil.copytree(conditional / "model", old)
    saved = yaml.safe_load((old / "config.yaml").read_text())
    saved["train"] = {**saved["train"], "ema_decay": 0.999, "ema_warmup": True}
    (old / "config.yaml").write_text(yaml.safe_dump(saved))
    model, cfg = load_model(old)
    assert cfg.model == load_model(conditional)[1].model and isinstance(model, GNUNet)


def test_an_export_made_before_the_layered_folders_loads_through_diffusers(conditional, tmp_path):
    """Older exports name GNUNet's module gn_diffusion.unet in model_index.json."""
    old = tmp_path / "old-model"
    shutil.copytree(conditional / "model", old)
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps({**index, "unet": [OLD_UNET_MODULE, "GNUNet"]}))
    with pipeline_loader_warnings():
        pipe = DiffusionPipeline.from_pretrained(str(old))
    assert isinstance(pipe, GNPipeline) and type(pipe.unet) is GNUNet


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_diffusers_pipeline_image_0_is_sample_py_image_0(unconditional, tmp_path, scheduler):
    ours = sample_py_images(unconditional, tmp_path / "out", f"sample.scheduler={scheduler}", "sample.num_images=2")
    with pipeline_loader_warnings() as warnings:
        pipe = DiffusionPipeline.from_pretrained(str(unconditional / "model"))
    assert type(pipe) is GNDDPMPipeline and isinstance(pipe, DDPMPipeline)
    assert GNDDPMPipeline.__call__ is DDPMPipeline.__call__  # diffusers' own sampling loop
    assert [r.getMessage() for r in warnings] == []  # no "Expected types for unet" about GNUNet
    if scheduler == "ddim":  # DDIMPipeline turns the saved DDPM scheduler config into DDIM's
        pipe = DDIMPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(batch_size=1, num_inference_steps=3, generator=seeded_generator(SEED, 0)).images[0]
    theirs = np.asarray(image)  # diffusers' own float -> uint8 -> PIL conversion
    assert theirs.dtype == np.uint8 and theirs.shape == ours.shape[1:3]
    assert np.array_equal(theirs, ours[0, ..., 0])
    assert ours[0].std() > 0


def test_gn_pipeline_with_labels_and_guidance_is_sample_py(conditional):
    with pipeline_loader_warnings() as warnings:
        pipe = DiffusionPipeline.from_pretrained(str(conditional / "model"))
    assert isinstance(pipe, GNPipeline) and not warnings
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    model, cfg = load_model(conditional)
    cfg = with_sample(cfg, class_labels=[1, 2, 3], guidance_scale=2.0, seed=SEED)
    expected, labels = generate(model, cfg, progress=False)
    generators = [seeded_generator(SEED, i) for i in range(len(labels))]
    got = pipe(class_labels=labels, guidance_scale=2.0, num_inference_steps=3, generator=generators,
               output_type="pt").images
    torch.testing.assert_close(got, (expected + 1) / 2, rtol=0, atol=1e-6)
    plain = pipe(class_labels=labels, num_inference_steps=3, generator=[seeded_generator(SEED, i) for i in range(4)],
                 output_type="pt").images
    assert not torch.allclose(plain, got)
    with pytest.raises(ValueError, match="must be in 0..9"):
        pipe(class_labels=[10], num_inference_steps=1)


def flat_export(model, cfg, folder: Path) -> Path:
    """A model folder as exports wrote it before the pipeline layout."""
    model.save_pretrained(folder, safe_serialization=True)
    make_scheduler(cfg.diffusion, "ddpm").save_pretrained(folder)
    save_config(cfg, folder / "config.yaml")
    return folder


def test_older_flat_model_folders_still_load_and_sample(tmp_path, unconditional):
    cfg = tiny_config(tmp_path / "run")
    folder = flat_export(random_model(cfg), cfg, tmp_path / "run" / "model")
    assert model_dir(tmp_path / "run") == folder and model_dir(folder) == folder
    model, _ = load_model(folder)
    expected = random_model(cfg).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    flat = sample_py_images(tmp_path / "run", tmp_path / "flat", "sample.num_images=2")
    assert np.array_equal(flat, sample_py_images(unconditional, tmp_path / "new", "sample.num_images=2"))
    weights = folder / WEIGHTS_FILE  # the checks before loading hold for this layout too
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="is not a complete safetensors file"):
        load_model(folder)


@pytest.mark.parametrize("scheduler", ["euler", "heun", "unipc"])
def test_new_samplers_make_finite_batch_independent_images(conditional, scheduler):
    model, cfg = load_model(conditional)
    cfg = with_sample(cfg, scheduler=scheduler, class_labels=[0, 5, 9], guidance_scale=2.0, num_images=3)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    together, _ = generate(model, cfg, progress=False)
    hook.remove()
    alone, _ = generate(model, with_sample(cfg, batch_size=1), progress=False)
    assert together.shape == (3, 1, 8, 8) and torch.isfinite(together).all()
    assert together.std() > 0.05 and together.abs().max() <= 1
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    assert len(calls) == (2 * 3 - 1 if scheduler == "heun" else 3)  # heun: two model calls a step, one at the end
    pipe = load_pipeline(conditional, scheduler)
    got = pipe(class_labels=[0, 5, 9], guidance_scale=2.0, num_inference_steps=3, output_type="pt",
               generator=[seeded_generator(cfg.sample.seed, i) for i in range(3)]).images
    torch.testing.assert_close(got, (together + 1) / 2, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheduler, steps, limit", [("unipc", 100, 99), ("euler", 150, None), ("heun", 150, None)])
def test_step_count_limits_of_the_new_samplers(scheduler, steps, limit, tmp_path):
    cfg = with_sample(tiny_config(tmp_path), scheduler=scheduler, num_inference_steps=steps)  # 100 train steps
    if limit is None:
        check_sampling(cfg)  # fractional timesteps: any count is distinct
        return
    with pytest.raises(ConfigError, match=f"takes at most {limit} steps"):
        check_sampling(cfg)
    check_sampling(with_sample(cfg, num_inference_steps=limit))


def fake_checkpoint(model, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / CHECKPOINT_MODEL_FILE)
    (folder / STATE_FILE).write_text('{"step": 1, "ema_updates": 1}')
    return folder


def test_init_weights_from_either_layout_a_run_or_a_checkpoint(tmp_path, unconditional):
    cfg = tiny_config(tmp_path / "run")
    source = random_model(cfg).state_dict()
    flat = flat_export(random_model(cfg), cfg, tmp_path / "flat")
    checkpoint = fake_checkpoint(random_model(cfg), tmp_path / "run" / "checkpoints" / "step-1")
    for path, read in [(unconditional / "model", unconditional / "model" / "unet" / WEIGHTS_FILE),
                       (unconditional, unconditional / "model" / "unet" / WEIGHTS_FILE),
                       (flat, flat / WEIGHTS_FILE), (checkpoint, checkpoint / CHECKPOINT_MODEL_FILE)]:
        model = build_unet(cfg.model)
        assert init_weights_from(model, path) == read
        assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items()), path


def test_init_weights_from_names_a_mismatch(tmp_path, unconditional):
    other = build_unet(tiny_config(tmp_path, "model.base_channels=32").model)
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model.safetensors holds weights of another architecture "
                       r"\('conv_in.bias' is \[16\] there but \[32\] in this config's model\)"):
        init_weights_from(other, unconditional / "model")
    with pytest.raises(UserError, match="is not an exported model"):
        init_weights_from(other, tmp_path)
