"""Config loading, overrides and the one-sentence errors for bad values."""

import os
import subprocess
import sys
import typing

import pytest

from gn_diffusion import Config, ConfigError, config_from_dict, load_config
from gn_diffusion.config import DiffusionConfig, RuntimeConfig, SampleConfig, TrainConfig, load_saved_config
from gn_diffusion.cli import split_args
from gn_diffusion.model.unet import check_model_config

from conftest import ROOT


def test_overrides_are_typed_and_applied():
    cfg = load_config("configs/digits.yaml", [
        "train.lr=1e-4", "model.channel_mult=[1,2,2]", "model.attention_resolutions=4",
        "model.norm=batch", "train.resume=auto", "model.dropout=0",
    ])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.channel_mult == [1, 2, 2]
    assert cfg.model.attention_resolutions == [4]
    assert cfg.model.norm == "batch"
    assert cfg.train.resume == "auto"
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)


def test_defaults_without_a_file_and_round_trip_through_a_dict():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_cli_arguments_split_into_config_and_overrides():
    assert split_args([], "configs/digits.yaml") == ("configs/digits.yaml", [])
    assert split_args(["train.lr=1"], "d.yaml") == ("d.yaml", ["train.lr=1"])
    assert split_args(["c.yaml", "train.lr=1"], "d.yaml") == ("c.yaml", ["train.lr=1"])


def message(overrides, path="configs/digits.yaml") -> str:
    """The one sentence of a config refused by the schema or by the model's own checks."""
    with pytest.raises(ConfigError) as info:
        check_model_config(load_config(path, overrides).model)
    text = str(info.value)
    assert "\n" not in text
    return text


def test_unknown_key_suggests_the_close_match():
    assert "did you mean 'train.lr'" in message(["train.lrr=1e-4"])
    assert "did you mean 'model.norm'" in message(["model.nrom=group"])
    assert "unknown key 'bogus'" in message(["bogus.x=1"])


def test_wrong_type_names_the_key_and_the_type():
    text = message(["train.max_steps=many"])
    assert "'train.max_steps' must be an integer" in text and "'many'" in text
    assert "must be true or false" in message(["model.scale_shift=3"])
    assert "must be a list" in message(["model.channel_mult={a: 1}"])


def test_channels_not_divisible_by_groups_name_each_width_and_a_fix():
    text = message(["model.base_channels=48", "model.groups=32"])
    # 48-channel blocks and the 144 = 96 + 48 skip concatenation on the way up
    assert "48" in text and "144" in text
    assert "set model.groups=24" in text  # the largest count <= 32 dividing every width
    check_model_config(load_config("configs/digits.yaml", ["model.base_channels=48", "model.groups=24"]).model)


def test_groups_are_not_checked_for_norms_without_groups():
    cfg = load_config("configs/digits.yaml", ["model.base_channels=48", "model.norm=layer"])
    check_model_config(cfg.model)
    assert cfg.model.norm == "layer"


def test_unknown_norm_kind_lists_the_choices():
    text = message(["model.norm=weight"])
    assert "'weight'" in text and "group" in text and "batch" in text


@pytest.mark.parametrize("override,needle", [
    ("train.batch_size=0", "'train.batch_size' must be positive"),
    ("sample.num_images=-3", "'sample.num_images' must be positive"),
    ("train.ema_rampup=-1", "'train.ema_rampup' must be"),
    ("diffusion.beta_schedule=quadratic", "choose one of linear, cosine"),
    ("sample.scheduler=lms", "choose one of ddpm, ddim, dpm-solver++, euler, heun, unipc"),
    ("model.attention_resolutions=[5]", "not a resolution of this U-Net"),
    ("model.image_size=15", "halves evenly 0 times, too few for 2 levels"),
    ("model.attention_heads=3", "does not divide attention width"),
    ("sample.class_labels=[3]", "unconditional"),
    ("model.in_channels=3", "digits dataset is greyscale"),
    ("train.lr", "not of the form section.key=value"),
    ("train.lr=inf", "'train.lr' must be a finite number"),
    ("train.grad_clip=nan", "'train.grad_clip' must be a finite number"),
    ("model.norm_eps=-inf", "'model.norm_eps' must be a finite number"),
    ("sample.guidance_scale=.inf", "'sample.guidance_scale' must be a finite number"),
    ("runtime.backend=cuda", "'runtime.backend' is 'cuda'; choose one of auto, triton, torch"),
    ("runtime.compile=fast", "choose one of none, default, max-autotune, reduce-overhead"),
    ("eval.num_images=1", "'eval.num_images' must be at least 2"),
    ("sample.guidance_scale=3", "the model is unconditional"),
])
def test_bad_values_get_one_clear_sentence(override, needle):
    assert needle in message([override])


def test_missing_and_malformed_files(tmp_path):
    assert "does not exist" in message([], path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in message([], path=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "mapping of section names" in message([], path=listy)


def test_config_module_imports_nothing_of_the_model():
    """config.py is the bottom of the import graph: no torch, no unet, norms or kernels."""
    code = ("import sys; import gn_diffusion.config; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('gn_diffusion.model', "
            "'gn_diffusion.kernels', 'torch.'))]; print(bad[:5])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "[]", done.stdout


def schema_choices(section, key: str) -> tuple:
    return typing.get_args(typing.get_type_hints(section)[key])


def test_the_samplers_are_exactly_sample_scheduler_s_choices():
    from gn_diffusion.diffusion.schedules import _SCHEDULERS, SCHEDULER_NAMES, make_scheduler

    choices = schema_choices(SampleConfig, "scheduler")
    assert len(choices) == 6 and SCHEDULER_NAMES == choices
    assert sorted(_SCHEDULERS) == sorted(choices)  # every name has a diffusers class, and no other name
    for name in choices:
        assert make_scheduler(DiffusionConfig(num_train_timesteps=10), name).config.num_train_timesteps == 10


def test_the_kernel_backends_are_exactly_runtime_backend_s_choices():
    from gn_diffusion.kernels import BACKENDS

    choices = schema_choices(RuntimeConfig, "backend")
    assert len(choices) == 3 and sorted(BACKENDS) == sorted(choices)


def test_moved_keys_are_read_with_a_note_naming_the_new_key(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  kernels: torch\ntrain:\n  cpu: true\n  cpu_threads: 3\n")
    cfg = load_config(old)
    assert (cfg.runtime.backend, cfg.runtime.cpu, cfg.runtime.cpu_threads) == ("torch", True, 3)
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == ["note: model.kernels is now runtime.backend; read as runtime.backend.",
                     "note: train.cpu is now runtime.cpu; read as runtime.cpu.",
                     "note: train.cpu_threads is now runtime.cpu_threads; read as runtime.cpu_threads."]
    assert load_config(None, ["train.cpu_threads=2"]).runtime.cpu_threads == 2
    assert "train.cpu_threads is now runtime.cpu_threads" in capsys.readouterr().err
    assert load_config(old, ["runtime.backend=auto"]).runtime.backend == "auto"  # the new key wins


def test_a_retired_key_is_refused_where_written_and_dropped_from_a_saved_config(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"train.ema_decay is no longer a setting; .*train.ema_halflife_images"):
        load_config(None, ["train.ema_decay=0.999"])
    old = tmp_path / "config.yaml"
    old.write_text("train:\n  ema_decay: 0.999\n  ema_warmup: true\n  lr: 0.003\n")
    with pytest.raises(ConfigError, match="train.ema_decay is no longer a setting"):
        load_config(old)
    cfg = load_saved_config(old)  # a run folder's or an older export's config.yaml
    assert cfg.train.lr == 0.003 and cfg.train.ema_halflife_images == TrainConfig().ema_halflife_images
    capsys.readouterr()
    old.write_text("train:\n  ema_decay: 0.999\n  sample_images: 9\n")
    assert load_saved_config(old).train.sample_num_images == 9
    assert capsys.readouterr().err == ""  # nobody wrote that file by hand: no notes about it


def test_the_old_image_count_names_are_read_as_num_images(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  sample_images: 9\neval:\n  num_samples: 7\n")
    cfg = load_config(old)
    assert (cfg.train.sample_num_images, cfg.eval.num_images) == (9, 7)
    assert "note: eval.num_samples is now eval.num_images" in capsys.readouterr().err
    assert load_config(None, ["eval.num_samples=5"]).eval.num_images == 5


def test_runtime_settings_are_their_own_section():
    cfg = load_config("configs/digits.yaml", ["runtime.compile=default", "runtime.channels_last=true"])
    assert cfg.runtime.compile == "default" and cfg.runtime.channels_last and not cfg.runtime.deterministic
    assert cfg.runtime.cpu_threads == 0  # configs/digits.yaml leaves the machine's threads to torch
    assert "kernels" not in cfg.to_dict()["model"] and "cpu" not in cfg.to_dict()["train"]


def test_a_bare_yaml_no_is_read_as_the_choice_no():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_help_lists_every_key_with_its_type_default_and_help(capsys):
    from gn_diffusion.cli import run_cli
    from gn_diffusion.typed import describe_fields

    from conftest import script_main

    run_cli(script_main("train.py"), ["--help"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    rows = describe_fields(Config)
    assert {key for key, *_ in rows} == {f"{s}.{k}" for s, v in Config().to_dict().items() for k in v}
    for key, kind, default, help_text in rows:
        assert help_text, f"{key} has no help: give its field a trailing comment in config.py"
        assert lines[key].split()[1] == default.split()[0] and lines[key].endswith(f"{kind}: {help_text}"), key
    assert "AdamW's learning rate" in lines["train.lr"]
    run_cli(script_main("sample.py"), ["--help"])
    sample_help = capsys.readouterr().out
    assert "sample.scheduler" in sample_help and "runtime.backend" in sample_help and "train.lr " not in sample_help
