"""The sample.py command, and the settings a trained model may be sampled or scored with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config, RuntimeConfig, load_saved_config, parse_override, with_overrides
from ..errors import ConfigError
from ..run_folder.claim import refuse_writing_into
from ..run_folder.layout import CONFIG_FILE, RunLayout
from ..runtime import cpu_threads
from .checks import check_sampling
from .generate import generate
from .model_folder import load_model, model_dir
from .output import check_output_folder, save_samples


def check_changeable(overrides: list[str], sections: tuple[str, ...], command: str) -> None:
    """A ConfigError naming the first override outside `sections` (the others belong to training)."""
    fixed = [key for key, _ in map(parse_override, overrides) if not key.startswith(sections)]
    if fixed:
        allowed = " and ".join(f"{s}*" for s in sections)
        raise ConfigError(f"{command} takes only {allowed} settings (got {fixed[0]}); train another model to change the others.")


def config_here(run_cfg: Config, overrides: list[str]) -> Config:
    """A trained run's config with `overrides`; runtime starts from the defaults, since the run's
    own said how it ran where it trained."""
    return with_overrides(dataclasses.replace(run_cfg, runtime=RuntimeConfig()), overrides)


def sample_config(path: str | Path, overrides: list[str]) -> Config:
    """The config sample.py runs with: the model's, with `sample.*` and `runtime.*` overrides."""
    check_changeable(overrides, ("sample.", "runtime."), "sample.py")
    return config_here(load_saved_config(model_dir(path) / CONFIG_FILE), overrides)


def sample_main(path: str, overrides: list[str]) -> Path:
    """sample.py: load a run's model, apply `sample.*` overrides, generate and save. Every check
    (settings, step count, output folder) runs before the model is loaded."""
    from accelerate import Accelerator

    folder = model_dir(path)
    cfg = sample_config(folder, overrides)
    out = Path(cfg.sample.output_dir or RunLayout(folder.parent).generated)
    check_sampling(cfg)
    refuse_writing_into(out, "wait for it to end, or set sample.output_dir outside that run")
    check_output_folder(out)
    accelerator = Accelerator(cpu=cfg.runtime.cpu)
    with cpu_threads(cfg.runtime.cpu_threads):  # restored when sample_main returns
        model, _ = load_model(folder, use_ema=cfg.sample.use_ema, runtime=cfg.runtime)
        images, labels = generate(model.to(accelerator.device), cfg, accelerator=accelerator)
    if accelerator.is_main_process:
        save_samples(images, labels, out)
        print(f"wrote {len(images)} images to {out} (grid.png, images/, samples.npz)")
    accelerator.wait_for_everyone()
    return out
