"""Score a trained model's samples beside the real-data floor.

usage: python -m gn_diffusion.evaluate RUN_DIR [key=value ...]

RUN_DIR is a training run's output folder (or its model/ folder). The report (Frechet distance,
KID, class coverage, KL from uniform, per-class accuracy; each beside the floor of real training
images of the same count against the same held-out images) is printed and saved as
RUN_DIR/evaluation.json. Digits models are scored against the held-out digits with a small
digits classifier's features (trained in seconds, cached). Keys:
  eval.num_samples=500         images to generate
  eval.kid_subsets=100  eval.kid_subset_size=100  eval.coverage_share=0.25  eval.seed=0
  eval.cache_dir=PATH          digits classifier cache ($GN_DIFFUSION_CACHE or ~/.cache/gn_diffusion)
  eval.extractor=MODULE:FACTORY  your own features: FACTORY(image_size=, in_channels=) returns a
                               callable images [N,C,H,W] in [-1,1] -> features [N,D]
  eval.reference_dir=FOLDER    a model trained on an image folder: held-out images it never saw
                               (needs eval.extractor; the floor draws from the training folder)
  sample.KEY=VALUE             the run's sampling settings (scheduler, num_inference_steps,
                               batch_size, seed, class_labels, guidance_scale)
"""

from __future__ import annotations

import json
from pathlib import Path

from .cli import run_cli
from .errors import UserError
from .config import with_overrides
from .evaluation import evaluator_for, sample_and_report, split_eval_overrides


def main(argv: list[str]) -> None:
    if not argv or "=" in argv[0]:
        raise UserError("name the run to evaluate: python -m gn_diffusion.evaluate RUN_DIR [key=value ...].")
    run_dir, overrides = Path(argv[0]), argv[1:]
    settings, sample_overrides = split_eval_overrides(overrides)
    from .sampling import load_model

    model, cfg = load_model(run_dir)
    cfg = with_overrides(cfg, sample_overrides)
    report = sample_and_report(model, cfg, evaluator_for(cfg, settings), settings.num_samples)
    print(report.format())
    out = run_dir / "evaluation.json"
    out.write_text(json.dumps({"run": str(run_dir), "eval": vars(settings), **report.to_dict()}, indent=2))
    print(f"saved {out}")


main.__doc__ = __doc__  # --help prints the module's usage

if __name__ == "__main__":
    run_cli(main)
