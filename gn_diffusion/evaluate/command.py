"""Score a trained model's samples beside the real-data floor.

usage: python -m gn_diffusion.evaluate RUN_DIR [key=value ...]

RUN_DIR is a training run's output folder (or its model/ folder). The report (Frechet distance,
KID, class coverage, KL from uniform, per-class accuracy; each beside the floor of real training
images of the same count against the same held-out images) is printed and saved as
RUN_DIR/evaluation.json. Digits models are scored against the held-out digits with a small
digits classifier's features (trained in seconds, cached). The run's own eval, sample and
runtime settings apply, except that runtime.* starts from the defaults here (a run trained
with Triton kernels evaluates on a CPU). Keys:
  eval.num_images=500         images to generate
  eval.kid_subsets=100  eval.kid_subset_size=100  eval.coverage_share=0.25  eval.seed=0
  eval.cache_dir=PATH          classifier cache ($GN_DIFFUSION_CACHE or ~/.cache/gn_diffusion)
  eval.extractor=MODULE:FACTORY  your own features: FACTORY(image_size=, in_channels=) returns a
                               callable images [N,C,H,W] in [-1,1] -> features [N,D]
  eval.extractor=classifier    labelled data (class sub-folders, an hf label column): the digits'
                               CNN trained on the run's training data (cached), its accuracy on
                               the held-out images
  eval.reference_dir=FOLDER    a model trained on an image folder: held-out images it never saw
                               (needs eval.extractor; the floor draws from the training folder)
  sample.KEY=VALUE             the run's sampling settings (scheduler, num_inference_steps,
                               batch_size, seed, class_labels, guidance_scale, use_ema)
  runtime.KEY=VALUE            how the model runs here (backend, cpu, cpu_threads)

Before any sampling it checks that evaluation.json can be written, that the scheduler takes the
step count, that the model loads and that the extractor builds and scores the reference images.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

from ..cli import run_settings
from ..config import Config, load_saved_config
from ..errors import UserError
from ..files import check_writable, write_text_atomic
from ..run_folder.layout import RunLayout

SECTIONS = ("eval.", "sample.", "runtime.")


def evaluation_config(run_cfg: Config, overrides: list[str]) -> Config:
    """The run's config with eval.*, sample.* and runtime.* overrides, runtime from the defaults."""
    from ..sample.command import check_changeable, config_here

    check_changeable(overrides, SECTIONS, "evaluate")
    return config_here(run_cfg, overrides)


def main(argv: list[str]) -> None:
    if not argv or "=" in argv[0]:
        raise UserError("name the run to evaluate: python -m gn_diffusion.evaluate RUN_DIR [key=value ...].")
    from accelerate import Accelerator

    from ..run_folder.claim import refuse_writing_into
    from ..run_folder.layout import CONFIG_FILE
    from ..runtime import cpu_threads
    from ..sample.checks import check_sampling
    from ..sample.command import check_changeable
    from ..sample.generate import every_class_once, generate
    from ..sample.model_folder import load_model, model_dir
    from .metric import evaluator_for

    run_dir, overrides = Path(argv[0]), argv[1:]
    # before the run is read: a refused key is named whatever RUN_DIR holds
    check_changeable(overrides, SECTIONS, "evaluate")
    folder = model_dir(run_dir)  # looked up once: each look checks (and may repair) the model's swap
    cfg = evaluation_config(load_saved_config(folder / CONFIG_FILE), overrides)
    # Every check before the sampling, the long part: the report can be written, the sampling
    # settings work, the model loads and the extractor is built and scores the reference.
    refuse_writing_into(RunLayout(run_dir).evaluation, "wait for it to end, then evaluate it")
    check_report_target(RunLayout(run_dir).evaluation)
    check_sampling(cfg, "eval.num_images")  # evaluate makes eval.num_images images, not sample.num_images
    model, _ = load_model(folder, use_ema=cfg.sample.use_ema, runtime=cfg.runtime)
    accelerator = Accelerator(cpu=cfg.runtime.cpu)
    with cpu_threads(cfg.runtime.cpu_threads):
        evaluator = evaluator_for(cfg)
        images, labels = generate(model.to(accelerator.device), every_class_once(cfg, cfg.eval.num_images),
                                  accelerator=accelerator)
        report = evaluator.report(images, labels, made_by=f"the model {folder}")
    if accelerator.is_main_process:
        save_report(run_dir, cfg, report)


def check_report_target(path: Path) -> None:
    """Raise the OSError that writing the report to `path` would raise, before any sampling."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    check_writable(path.parent)


def save_report(run_dir: Path, cfg: Config, report) -> None:
    print(report.format())
    out = RunLayout(run_dir).evaluation
    write_text_atomic(out, json.dumps({"run": str(run_dir), "eval": dataclasses.asdict(cfg.eval), **report.to_dict()}, indent=2))
    print(f"saved {out}")


main.__doc__ = __doc__  # --help prints the module's usage
main.settings = run_settings(*SECTIONS)  # and these keys
