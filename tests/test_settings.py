"""Settings that the schema accepts in form but the machine or the model cannot run: seeds
beyond their generators, output channels, thread counts, sizes beyond memory, unreadable or
exploding config files; and --help, which shows the values a command would run with."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gn_diffusion import ConfigError, load_config
from gn_diffusion.cli import run_cli
from gn_diffusion.typed import describe_fields

from conftest import ROOT, TINY, assert_fails_cleanly, script_main

TOO_MUCH = 2**50  # elements: a PiB or more, past any address space, so refused at once whatever the overcommit policy
SEED_MAX = 2**32 - 1  # numpy's global seed (accelerate's set_seed) takes 0 .. 2**32 - 1


def refusal(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    text = str(info.value)
    assert "\n" not in text and len(text) < 1000, text
    return text


def train_args(out, *extra):
    return [*TINY, f"train.output_dir={out}", "train.max_steps=1", *extra]


# --- seeds -----------------------------------------------------------------------------------


def test_every_seed_of_the_schema_is_bounded_by_what_its_generators_take():
    from accelerate.utils import set_seed

    from gn_diffusion.diffusion.seeding import seeded_generator

    seeds = [(key, kind) for key, kind, *_ in describe_fields(type(load_config()))
             if key.rsplit(".", 1)[1] == "seed"]
    assert {key for key, _ in seeds} == {"train.seed", "sample.seed", "eval.seed"}
    assert all(kind == f"int, in [0, {SEED_MAX}]" for _, kind in seeds), seeds
    with torch.random.fork_rng(devices=[]):
        set_seed(SEED_MAX)  # the largest accepted seed runs; one more does not
        with pytest.raises(ValueError):
            set_seed(SEED_MAX + 1)
    seeded_generator(SEED_MAX, 2**40, 7)  # combined seeds stay in torch's range


@pytest.mark.parametrize("override", ["train.seed=-1", f"train.seed={2**32}", f"sample.seed={2**64}",
                                      "sample.seed=-1", "eval.seed=-5", "train.seed=1.0e+30"])
def test_a_seed_out_of_range_is_one_sentence(override):
    key = override.split("=")[0]
    assert f"'{key}' must be in [0, 4294967295], got" in refusal([override])


def test_the_ablation_grids_seeds_are_bounded_too():
    from gn_diffusion.ablation.grid import load_ablation_config

    with pytest.raises(ConfigError, match=r"'grid.seeds' must be in \[0, 4294967295\], got \[0, -1\]"):
        load_ablation_config(ROOT / "configs" / "ablation_norms.yaml", ["grid.seeds=[0, -1]"])


def test_train_refuses_a_bad_sample_seed_before_training(tmp_path, capsys):
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", "sample.seed=-1"),
                         "'sample.seed' must be in [0, 4294967295], got -1.", tmp_path)
    assert not (tmp_path / "out").exists()


# --- output channels and threads -------------------------------------------------------------


@pytest.mark.parametrize("kind, what", [("epsilon", "the noise"), ("v_prediction", "v"), ("sample", "the clean image")])
def test_out_channels_other_than_in_channels_are_refused(kind, what):
    text = refusal(["model.out_channels=2", f"diffusion.prediction_type={kind}"])
    assert text == (f"'model.out_channels' is 2 but the model predicts {what} (diffusion.prediction_type={kind}), "
                    "which has model.in_channels=1 channels; set model.out_channels=null (the same as in_channels).")
    assert load_config(None, ["model.out_channels=1"]).model.out_channels == 1


def test_train_refuses_out_channels_and_too_many_threads_before_the_folder_is_made(tmp_path, capsys):
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", "model.out_channels=2"),
                         "'model.out_channels' is 2 but", tmp_path)
    cpus = os.cpu_count()
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", f"runtime.cpu_threads={cpus + 1}"),
                         f"'runtime.cpu_threads' is {cpus + 1} but this machine has {cpus} logical CPUs; "
                         f"set runtime.cpu_threads={cpus} or fewer", tmp_path)
    assert not (tmp_path / "out").exists()


def test_sample_refuses_too_many_threads_before_writing(run_dir, capsys):
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), "runtime.cpu_threads=1000000"],
                         "'runtime.cpu_threads' is 1000000 but this machine has", run_dir)
    assert not (run_dir / "generated").exists()


# --- memory ----------------------------------------------------------------------------------


def test_a_model_too_large_to_build_names_its_width(tmp_path, capsys):
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", "model.base_channels=200000"),
                         "ran out of memory while building the model; lower model.base_channels, model.channel_mult "
                         "or model.num_res_blocks and run the command again", tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_training_step_out_of_memory_names_the_batch_size(tmp_path, capsys, monkeypatch):
    from gn_diffusion.train.step import TrainStep

    monkeypatch.setattr(TrainStep, "__call__", lambda self, data, step: torch.empty(TOO_MUCH))  # as a huge batch
    with pytest.raises(SystemExit) as info:
        run_cli(script_main("train.py"), train_args(tmp_path / "out", "train.log_with=none"))
    assert info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (  # after the progress bar
        "error: ran out of memory while training; lower train.batch_size, model.image_size or model.base_channels "
        "and run the command again (files already written are left as they were).")
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_too_many_images_are_refused_before_any_work(run_dir, tmp_path, capsys):
    # Counts whose allocation, were the check missing, would fail at once rather than fill the memory.
    assert_fails_cleanly(capsys, "sample.py", [str(run_dir), f"sample.num_images={10**13}"],
                         f"'sample.num_images' is {10**13}: {10**13} images of 1x8x8 need at least", run_dir)
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", f"train.sample_num_images={10**13}"),
                         f"'train.sample_num_images' is {10**13}:", tmp_path)
    assert_fails_cleanly(capsys, "train.py", train_args(tmp_path / "out", f"sample.num_images={10**13}"),
                         f"'sample.num_images' is {10**13}:", tmp_path)  # the final grid's
    assert not (tmp_path / "out").exists() and not (run_dir / "generated").exists()


def test_the_memory_check_names_a_count_that_fits(run_dir):
    import psutil

    from gn_diffusion.sample.checks import check_images_fit, images_bytes
    from gn_diffusion.sample.command import sample_config

    cfg = sample_config(str(run_dir), ["sample.num_images=1000000000"])
    with pytest.raises(ConfigError) as info:
        check_images_fit(cfg, "sample.num_images")
    most = int(str(info.value).split("set sample.num_images=")[1].split()[0])
    assert images_bytes(cfg, most) <= psutil.virtual_memory().available * 1.1
    assert images_bytes(cfg, 1) == 8 * 8 * 4 + (8 * 16) ** 2  # float32 pixels and the 16x grid tile


def cuda_out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.25 TiB.")  # what CUDA's allocator raises


@pytest.mark.parametrize("fail", [lambda: torch.empty(TOO_MUCH), lambda: np.empty(TOO_MUCH), cuda_out_of_memory])
def test_an_allocation_that_fails_becomes_a_sentence_naming_the_settings(fail):
    from gn_diffusion.memory import OutOfMemory, lower_on_oom

    with pytest.raises(OutOfMemory) as info:
        with lower_on_oom("outer", "train.batch_size"), lower_on_oom("sampling", "sample.batch_size"):
            fail()
    assert str(info.value) == ("ran out of memory while sampling; lower sample.batch_size and run the command again "
                               "(files already written are left as they were).")
    with pytest.raises(ZeroDivisionError), lower_on_oom("sampling", "sample.batch_size"):
        1 / 0  # other errors pass unchanged


def test_a_data_loader_workers_out_of_memory_keeps_its_one_sentence():
    """A worker's error comes back built from its traceback's text (torch's ExceptionWrapper)."""
    from torch._utils import ExceptionWrapper

    from gn_diffusion.memory import OutOfMemory, lower_on_oom

    try:
        with lower_on_oom("reading images", "data.max_image_pixels"):
            np.empty(TOO_MUCH)
    except OutOfMemory:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(OutOfMemory) as info:
        wrapped.reraise()
    assert str(info.value).startswith("ran out of memory while reading images; lower data.max_image_pixels and")


def test_an_image_too_large_for_memory_names_the_pixel_limit(tmp_path, monkeypatch):
    from PIL import Image

    from gn_diffusion.data import sources
    from gn_diffusion.data.dataset import folder_source
    from gn_diffusion.memory import OutOfMemory

    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    dataset, _ = folder_source(tmp_path, 8, 1, False)
    monkeypatch.setattr(sources, "fit_image", lambda *args: np.empty(TOO_MUCH, dtype=np.uint8))  # as a huge resize
    with pytest.raises(OutOfMemory, match="while reading images; lower data.max_image_pixels"):
        dataset[0]


def test_an_out_of_memory_anywhere_else_is_one_line(capsys):
    def main(argv):
        torch.empty(TOO_MUCH)

    with pytest.raises(SystemExit) as info:
        run_cli(main, [])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("error: ran out of memory while running the command; lower train.batch_size, "
                                       "sample.batch_size, model.image_size or model.base_channels and run the "
                                       "command again (files already written are left as they were).\n")


# --- config files ----------------------------------------------------------------------------


@pytest.mark.parametrize("content, byte", [("model:\n  base_channels: 8\n".encode("utf-16"), 0),
                                           (bytes(range(256)), 128)])
def test_a_config_that_is_not_utf8_is_one_sentence(tmp_path, content, byte):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    assert refusal([], path) == (f"config file {path} is not UTF-8 text (byte {byte} cannot be read); "
                                 "save it as UTF-8 YAML, e.g. a copy of configs/digits.yaml.")


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    levels = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nmodel:\n  channel_mult: *a8\n")  # 9**9 integers once expanded
    assert refusal([], bomb) == (f"config file {bomb} uses a YAML alias (*a0, line 2); write the value out in full.")
    assert refusal(["model.channel_mult=[&x [1, 2], *x]"]) == (
        "override 'model.channel_mult' uses a YAML alias (*x, line 1); write the value out in full.")
    assert load_config(None, ["train.output_dir=*runs"]).train.output_dir == "*runs"  # no anchor: plain text
    anchored = tmp_path / "anchor.yaml"
    anchored.write_text("model:\n  channel_mult: &m [1, 2]\n")  # an anchor alone expands nothing
    assert load_config(anchored).model.channel_mult == [1, 2]


def test_a_huge_bad_value_is_quoted_short():
    assert len(refusal(["model.channel_mult=[" + "[1, 2], " * 500 + "]"])) < 150  # 4 kB of YAML
    assert len(refusal(["train.mixed_precision=" + "x" * 100_000])) < 150
    assert len(refusal(["train.lrr" + "r" * 100_000 + "=1"])) < 700  # the valid keys are listed


# --- --help ----------------------------------------------------------------------------------


def help_rows(capsys, script, args) -> dict[str, list[str]]:
    run_cli(script_main(script), [*args, "--help"])
    return {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}


def test_help_shows_the_config_values_beside_the_defaults(run_dir, capsys):
    rows = help_rows(capsys, "train.py", [])
    assert rows["key"] == ["key", "default", "digits.yaml", "type:", "what", "it", "does"]
    assert rows["model.base_channels"][1:3] == ["64", "32"]
    assert rows["train.max_steps"][1:3] == ["4000", "3000"] and rows["train.lr"][1:3] == ["0.0002", "0.002"]
    rows = help_rows(capsys, "train.py", ["configs/cifar10.yaml", "train.lr=3e-4"])
    assert rows["key"][2] == "cifar10.yaml" and rows["model.base_channels"][1:3] == ["64", "128"]
    assert rows["train.lr"][2] == "0.0003"
    rows = help_rows(capsys, "sample.py", [str(run_dir), "sample.seed=5"])
    assert rows["key"][2] == "run" and rows["sample.num_images"][1:3] == ["64", "4"] and rows["sample.seed"][2] == "5"
    assert "model.base_channels" not in rows


def test_help_names_every_scheduler_from_the_one_list(capsys):
    import typing

    from gn_diffusion.config import SampleConfig

    choices = typing.get_args(typing.get_type_hints(SampleConfig)["scheduler"])
    assert len(choices) == 6
    run_cli(script_main("sample.py"), ["--help"])
    text = capsys.readouterr().out
    mentions = [line for line in text.splitlines() if "dpm-solver++" in line or "ddim" in line]
    assert mentions and all(" | ".join(choices) in line for line in mentions), mentions


def test_help_into_a_closed_pipe_ends_quietly():
    """As `train.py --help | head -1` once head has gone: the pipe has no reader left."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr == "", done.stderr
