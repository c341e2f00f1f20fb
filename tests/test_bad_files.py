"""Files that are whole but wrong inside: a model with a non-finite weight (refused by name on
loading, for sampling, evaluation and train.init_from alike, before any folder is touched), a
finite model whose samples overflow (blamed, not the feature extractor), and a hand-edited
results.csv (each fault named by file:line). One `error:` sentence, exit 2, every file kept."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file, save_file

from conftest import ROOT, TINY, assert_fails_cleanly
from gn_diffusion.ablation import command as ablate
from gn_diffusion.ablation.results import read_results_csv
from gn_diffusion.errors import UserError
from gn_diffusion.evaluate import command as evaluate
from gn_diffusion.run_folder.layout import UNET_DIR, WEIGHTS_FILE

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
    assert_fails_cleanly(capsys, evaluate.main, [str(run_dir), "eval.num_images=4"], message, run_dir)
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
    assert_fails_cleanly(capsys, evaluate.main, [str(run_dir), "eval.num_images=4", "eval.kid_subsets=2"],
                         message, run_dir)


# ---------------------------------------------------------------------------------------------
# A hand-edited results.csv, rebuilt with --report-only

CONFIG = str(ROOT / "configs" / "ablation_norms.yaml")
NORMS = ROOT / "docs" / "ablation" / "norms" / "results.csv"


@pytest.fixture
def results(tmp_path):
    """A folder holding the header and first three rows of the committed norms results.csv."""
    lines = NORMS.read_text().splitlines(keepends=True)[:4]
    (tmp_path / "results.csv").write_text("".join(lines))
    return tmp_path


def edit(folder, line, change):
    """Apply `change` to the bytes of line `line` (1: the header) of folder/results.csv."""
    path = folder / "results.csv"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = change(lines[line - 1])
    path.write_bytes(b"".join(lines))
    return path


def field(line, column, value):
    """`line` with its field `column` (0-based) set to `value`."""
    fields = line.rstrip(b"\n").split(b",")
    fields[column] = value
    return b",".join(fields) + b"\n"


@pytest.mark.parametrize("line, change, message", [
    (3, lambda b: field(b, 7, b"1.2.3"), ":3: frechet is '1.2.3', not a number; fix or delete that line."),
    (2, lambda b: field(b, 6, b""), ":2: heldout_loss is '', not a number"),
    (4, lambda b: field(b, 1, b"4.5"), ":4: batch_size is '4.5', not an integer"),
    (3, lambda b: b",".join(b.split(b",")[:5]) + b"\n",
     ":3: the row has 5 fields where the header names 19; fix or delete that line."),
    (4, lambda b: b"\x89PNG\r\n\x1a\n\xff\xfe" + b, ":4: byte 0x89 is not text (results.csv is UTF-8 text)"),
    (2, lambda b: b"gr\x00oup" + b[5:], r":2: norm is 'gr\x00oup', which holds characters that are not text"),
    (1, lambda b: b.replace(b"heldout_loss,", b""), ":1: the header lacks the column heldout_loss; restore the header line"),
    (1, lambda b: b.replace(b"frechet,", b"frechet,frechet,", 1), ":1: the header names the column 'frechet' twice"),
    (4, lambda b: b + NORMS.read_bytes().splitlines(keepends=True)[1],
     ":5: the cell group-b2-s0 (the same norm, grouping, batch size and seed) is on line 2 too; delete one of"),
])
def test_a_hand_edited_results_csv_is_refused_naming_its_line(results, line, change, message):
    path = edit(results, line, change)
    with pytest.raises(UserError) as refused:
        read_results_csv(path)
    assert f"{path}{message}" in str(refused.value)


def test_blank_lines_and_quoted_fields_are_read_with_their_lines_counted(results):
    path = edit(results, 2, lambda b: b"\n" + b.replace(b"group,", b'"group",', 1))
    assert [(r.norm, r.batch_size) for r in read_results_csv(path)] == [("group", 2), ("group", 4), ("group", 8)]
    edit(results, 5, lambda b: field(b, 7, b"x"))  # the third row, after the blank line
    with pytest.raises(UserError, match="results.csv:5: frechet is 'x'"):
        read_results_csv(path)


def test_report_only_refuses_a_bad_results_csv_in_one_sentence_making_nothing(results, capsys):
    path = edit(results, 3, lambda b: b[:20] + b"\n")
    assert_fails_cleanly(capsys, ablate.main, [CONFIG, "--report-only", str(results)],
                         f"{path}:3: the row has 5 fields where the header names 19", results)
    assert sorted(p.name for p in results.iterdir()) == ["results.csv"]


def test_report_only_given_twice_is_refused(results, capsys):
    assert_fails_cleanly(capsys, ablate.main, [CONFIG, "--report-only", "--report-only", str(results)],
                         "--report-only is given twice; give it once", results)
