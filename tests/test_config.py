"""Config loading, overrides and the one-sentence errors for bad values."""

import pytest

from gn_diffusion import Config, ConfigError, config_from_dict, load_config
from gn_diffusion.cli import split_args


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
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
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
    assert load_config("configs/digits.yaml", ["model.base_channels=48", "model.groups=24"])


def test_groups_are_not_checked_for_norms_without_groups():
    cfg = load_config("configs/digits.yaml", ["model.base_channels=48", "model.norm=layer"])
    assert cfg.model.norm == "layer"


def test_unknown_norm_kind_lists_the_choices():
    text = message(["model.norm=weight"])
    assert "'weight'" in text and "group" in text and "batch" in text


@pytest.mark.parametrize("override,needle", [
    ("train.batch_size=0", "'train.batch_size' must be positive"),
    ("sample.num_images=-3", "'sample.num_images' must be positive"),
    ("train.ema_decay=1.5", "'train.ema_decay' must be in [0, 1)"),
    ("diffusion.beta_schedule=quadratic", "choose one of linear, cosine"),
    ("sample.scheduler=euler", "choose one of ddpm, ddim, dpm-solver++"),
    ("model.attention_resolutions=[5]", "not a resolution of this U-Net"),
    ("model.image_size=15", "cannot be halved"),
    ("model.attention_heads=3", "does not divide attention width"),
    ("sample.class_labels=[3]", "unconditional"),
    ("model.in_channels=3", "digits dataset is greyscale"),
    ("train.lr", "not of the form section.key=value"),
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
