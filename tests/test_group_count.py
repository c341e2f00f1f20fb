"""model.channels_per_group: the other way to give group norm's grouping. It round-trips through
a saved config, older configs and exported models still load, giving it beside model.groups is
one sentence, every layer gets width / k groups, widths k does not divide are named, and the two
ends are layer norm (G=1) and instance norm (k=1)."""

import json

import pytest
import torch
import yaml

from gn_diffusion.config import load_config, save_config
from gn_diffusion.errors import ConfigError
from gn_diffusion.model.norms import GroupNorm32
from gn_diffusion.model.unet import GNUNet, build_unet, check_model_config
from conftest import random_model

# Widths 16, 32 and the skip concatenations 48 and 64 (see unet.norm_widths).
SMALL = ["model.image_size=8", "model.base_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
         "model.attention_resolutions=[]"]


def small(*overrides):
    return load_config(None, [*SMALL, *overrides])


def test_a_saved_config_reads_back_the_same(tmp_path):
    for overrides in ([], ["model.groups=8"], ["model.channels_per_group=4"]):
        cfg = small(*overrides)
        save_config(cfg, tmp_path / "config.yaml")
        assert load_config(tmp_path / "config.yaml") == cfg
    assert small().model.groups == 32 and small().model.channels_per_group is None  # the default, resolved
    assert small("model.channels_per_group=4").to_dict()["model"]["groups"] is None


def test_old_run_configs_and_exported_models_still_load(tmp_path):
    raw = small("model.groups=8").to_dict()
    del raw["model"]["channels_per_group"]  # a config.yaml written before the key existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    model_cfg = load_config(tmp_path / "config.yaml").model
    assert (model_cfg.groups, model_cfg.channels_per_group) == (8, None)

    model = random_model(small("model.groups=8"))
    model.save_pretrained(tmp_path / "model")
    config_json = tmp_path / "model" / "config.json"
    old = {k: v for k, v in json.loads(config_json.read_text()).items() if k != "channels_per_group"}
    config_json.write_text(json.dumps(old))
    loaded = GNUNet.from_pretrained(tmp_path / "model")
    assert loaded.norm_out.num_groups == 8


def test_groups_and_channels_per_group_together_are_one_sentence():
    with pytest.raises(ConfigError) as info:
        small("model.groups=8", "model.channels_per_group=4")
    text = str(info.value)
    assert "\n" not in text and "'model.groups' (8) and 'model.channels_per_group' (4) are both set" in text
    assert "model.groups=null" in text
    small("model.groups=null", "model.channels_per_group=4")  # the fix it names


def test_every_layer_gets_width_over_k_groups():
    model = build_unet(small("model.channels_per_group=4").model)
    norms = [m for m in model.modules() if isinstance(m, GroupNorm32)]
    assert {m.num_channels for m in norms} == {16, 32, 48, 64}
    assert all(m.num_groups * 4 == m.num_channels for m in norms)


def test_widths_that_k_does_not_divide_are_named():
    with pytest.raises(ConfigError) as info:
        check_model_config(small("model.channels_per_group=32").model)
    assert str(info.value) == ("'model.channels_per_group' 32 does not divide the channel width(s) [16, 48] that a "
                               "norm sees; set model.channels_per_group=16 or change model.base_channels/channel_mult.")
    check_model_config(small("model.channels_per_group=16").model)
    check_model_config(small("model.channels_per_group=32", "model.norm=batch").model)  # batch norm has no groups


@pytest.mark.parametrize("grouping, same_as", [("model.groups=1", "layer"), ("model.channels_per_group=1", "instance")])
def test_the_two_ends_are_layer_and_instance_norm(grouping, same_as):
    model = random_model(small(grouping))
    other = build_unet(small(f"model.norm={same_as}").model).eval()
    other.load_state_dict(model.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, other(x, t).sample, rtol=0, atol=0)

