"""Files that are whole but wrong inside: a model with a non-finite weight (refused by name on
loading, for sampling, evaluation and train.init_from alike, before any folder is touched), and a
finite model whose samples overflow (blamed, not the feature extractor). One `error:` sentence,
exit 2, every file kept."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file, save_file

from conftest import TINY, assert_fails_cleanly
from gn_diffusion import evaluate
from gn_diffusion.layout import UNET_DIR, WEIGHTS_FILE

# ---------------------------------------------------------------------------------------------
# Model weights


def set_weights(run_dir, name, value):
    """Fill the exported model's tensor `name` with `value` (its first element only, for NaN)."""
    weights = run_dir / "model" / UNET_DIR / WEIGHTS_FILE
    tensors = load_file(weights)
    if math.isnan(value):
        tensors[name].view(-1)[0] = value
    else:
        tensors[name].fill_(value)
    save_file(tensors, weights, metadata={"format": "pt"})
    return weights


def nan_message(weights, name="conv_out.weight", others=""):
    return f"{weights} holds non-finite weights (NaN or infinite values in '{name}'{others}); the model diverged"


def test_sample_refuses_a_model_with_a_nan_weight_before_its_output_folder(run_dir, capsys):
    weights = set_weights(run_dir, "conv_out.weight", math.nan)
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir)], nan_message(weights), run_dir)
    assert not (run_dir / "generated").exists()


def test_evaluate_refuses_a_model_with_a_nan_weight_by_name(run_dir, capsys):
    weights = set_weights(run_dir, "conv_out.weight", math.nan)
    set_weights(run_dir, "time_embed.0.bias", -math.inf)  # the first of two is named, the other counted
    message = nan_message(weights, others=" and 1 other tensor(s)")
    assert_fails_cleanly(capsys, evaluate.main, [str(run_dir), "eval.num_samples=4"], message, run_dir)
    assert not (run_dir / "evaluation.json").exists()


def test_init_from_a_model_with_a_nan_weight_is_refused_before_the_run_folder(run_dir, tmp_path, capsys):
    weights = set_weights(run_dir, "conv_out.weight", math.nan)
    args = [*TINY, f"train.output_dir={tmp_path / 'new'}", "train.max_steps=5", f"train.init_from={run_dir}"]
    assert_fails_cleanly(capsys, "train.py", args, nan_message(weights), tmp_path)
    assert not (tmp_path / "new").exists()


def test_a_finite_model_whose_samples_overflow_is_blamed_not_the_extractor(run_dir, capsys):
    set_weights(run_dir, "conv_out.weight", 3e38)  # finite, but every output overflows
    message = (f"the model {run_dir / 'model'} generated 4 of 4 images with NaN or infinite pixels, which cannot be "
               "scored (the model is at fault, not the feature extractor")
    assert_fails_cleanly(capsys, evaluate.main, [str(run_dir), "eval.num_samples=4", "eval.kid_subsets=2"],
                         message, run_dir)
