"""GNUNet as diffusers' own model tests (ModelTesterMixin, UNetTesterMixin, the layerwise-casting
and group-offloading mixins) use a diffusers model, on a tiny U-Net on the CPU: file round trips
(pickle-free and .bin, variants, shards, torch_dtype, AutoModel), determinism and the two return
forms, EMA and gradient-checkpointed training, layerwise casting (inference, training, memory)
and group offloading."""

import re

import numpy as np
import pytest
import torch
from diffusers import AutoModel
from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
from diffusers.models import modeling_utils
from diffusers.training_utils import EMAModel

from gn_diffusion.model.unet import GNUNet

# Two levels, attention at 4x4 (and in the middle), three classes: every kind of layer GNUNet has.
INIT = dict(sample_size=8, in_channels=3, out_channels=None, base_channels=8, channel_mult=[1, 2],
            num_res_blocks=1, attention_resolutions=[4], attention_heads=2, dropout=0.0, norm="group",
            groups=4, norm_eps=1e-5, scale_shift=True, num_classes=3)


def tiny(**changes) -> GNUNet:
    """GNUNet built directly, as diffusers' tests build a model (not through build_unet)."""
    torch.manual_seed(0)
    return GNUNet(**{**INIT, **changes})


def inputs(dtype=torch.float32) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(2, 3, 8, 8, generator=gen).to(dtype), "timestep": torch.tensor([10, 500]),
            "class_labels": torch.tensor([0, 2])}


@torch.no_grad()
def output(model: GNUNet, dtype=torch.float32) -> torch.Tensor:
    return model(**inputs(dtype), return_dict=False)[0]


def assert_same_outputs(a: GNUNet, b: GNUNet, atol=1e-6):
    torch.testing.assert_close(output(a.eval()), output(b.eval()), rtol=0, atol=atol)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def skipped_by_layerwise_casting(model: GNUNet, name: str) -> bool:
    patterns = DEFAULT_SKIP_MODULES_PATTERN + tuple(model._skip_layerwise_casting_patterns or ())
    return any(re.search(p, name) for p in patterns)


# ---------------------------------------------------------------------------------------------
# Files


def test_save_load_round_trips_safetensors_bin_and_variants(tmp_path):
    model = tiny().eval()
    model.save_pretrained(tmp_path / "safe")
    assert (tmp_path / "safe" / "diffusion_pytorch_model.safetensors").is_file()
    assert_same_outputs(model, GNUNet.from_pretrained(tmp_path / "safe"), atol=0)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert_same_outputs(model, GNUNet.from_pretrained(tmp_path / "bin"), atol=0)
    model.save_pretrained(tmp_path / "variant", variant="fp16", safe_serialization=False)
    assert_same_outputs(model, GNUNet.from_pretrained(tmp_path / "variant", variant="fp16"), atol=0)
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
        GNUNet.from_pretrained(tmp_path / "variant")


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoints_load_with_and_without_parallel_loading(tmp_path, monkeypatch, variant):
    model = tiny().eval()
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(tmp_path, max_shard_size=f"{int(0.75 * size / 1024)}KB", variant=variant)
    index = "diffusion_pytorch_model.safetensors.index.json" if variant is None else \
        "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert (tmp_path / index).is_file() and len(list(tmp_path.glob("*.safetensors"))) == 2
    assert_same_outputs(model, GNUNet.from_pretrained(tmp_path, variant=variant), atol=0)
    monkeypatch.setattr(modeling_utils, "HF_ENABLE_PARALLEL_LOADING", True)
    assert_same_outputs(model, GNUNet.from_pretrained(tmp_path, variant=variant), atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_pretrained_with_torch_dtype_and_automodel(tmp_path, dtype):
    model = tiny().eval()
    model.save_pretrained(tmp_path)
    assert model._keep_in_fp32_modules is None  # so every parameter takes the asked dtype
    for low_cpu_mem_usage in (True, False):
        loaded = GNUNet.from_pretrained(tmp_path, torch_dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage)
        assert loaded.dtype == dtype and {p.dtype for p in loaded.parameters()} == {dtype}
    # A bare model folder (config.json's _class_name); a str, as diffusers 0.42's AutoModel joins it into text.
    auto = AutoModel.from_pretrained(str(tmp_path))
    assert type(auto) is GNUNet
    assert_same_outputs(model, auto, atol=0)


def test_config_attributes_and_parameter_count():
    model = tiny()
    assert GNUNet.from_config(model.config).config == model.config
    assert list(GNUNet.forward.__code__.co_varnames[1:3]) == ["sample", "timestep"]
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embeddings=True) < model.num_parameters()  # class_embed left out
    model.register_to_config(test_attribute=5)
    with pytest.warns(FutureWarning):
        assert model.test_attribute == 5
    with pytest.raises(AttributeError, match="^'GNUNet' object has no attribute 'does_not_exist'$"):
        model.does_not_exist


# ---------------------------------------------------------------------------------------------
# Forward and training


def test_forward_is_deterministic_nonzero_and_the_same_in_both_return_forms():
    model = tiny().eval()
    first, second = output(model), output(model)
    assert first.shape == (2, 3, 8, 8) and torch.equal(first, second)
    assert first.abs().max() > 0.1  # built directly, the output conv is not zeroed (build_unet's is)
    with torch.no_grad():
        as_dict = model(**inputs())
    assert torch.equal(as_dict.sample, first) and list(as_dict.values()) == [as_dict.sample]


def test_ema_and_gradient_checkpointing_give_the_same_gradients():
    plain = tiny().train()
    ema = EMAModel(plain.parameters())
    out = plain(**inputs(), return_dict=False)[0]
    labels = torch.randn_like(out)
    (out - labels).pow(2).mean().backward()
    ema.step(plain.parameters())
    assert ema.optimization_step == 1

    checkpointed = tiny().train()
    assert not checkpointed.is_gradient_checkpointing
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    assert {type(m).__name__ for m in checkpointed.modules() if getattr(m, "gradient_checkpointing", False)} == {"GNUNet"}
    (checkpointed(**inputs(), return_dict=False)[0] - labels).pow(2).mean().backward()
    grads = {k: p.grad for k, p in checkpointed.named_parameters()}
    assert all(p.grad is not None for p in plain.parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-6, msg=name)
    checkpointed.disable_gradient_checkpointing()
    assert not checkpointed.is_gradient_checkpointing


# ---------------------------------------------------------------------------------------------
# Layerwise casting and group offloading


@pytest.mark.parametrize("storage, compute", [
    (torch.float8_e4m3fn, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float8_e5m2, torch.float32), (torch.float8_e4m3fn, torch.bfloat16)])
def test_layerwise_casting_stores_low_and_computes_high(storage, compute):
    reference = output(tiny().eval())
    model = tiny().eval().to(dtype=compute)
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
    for name, layer in model.named_modules():
        if isinstance(layer, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            expected = compute if skipped_by_layerwise_casting(model, name) else storage
            assert {p.dtype for p in layer.parameters()} == {expected}, name
    assert {p.dtype for p in model.norm_out.parameters()} == {compute}  # the norms are never cast
    out = output(model, compute)
    assert out.dtype == compute and torch.isfinite(out).all()
    assert cosine(out, reference) > 0.95
    assert model.conv_in.weight.dtype == storage  # stored low again after the forward


def test_layerwise_casting_trains_under_autocast_and_shrinks_the_footprint():
    for storage in (torch.float16, torch.float8_e4m3fn):
        model = tiny().train()
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        with torch.autocast("cpu"):
            loss = torch.nn.functional.mse_loss(model(**inputs(), return_dict=False)[0], torch.zeros(2, 3, 8, 8))
        loss.backward()
        assert model.conv_out.weight.grad is not None and torch.isfinite(model.conv_out.weight.grad.float()).all()

    def footprint(storage, compute):
        model = tiny().eval().to(dtype=compute)
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute)
        output(model, compute)
        return model.get_memory_footprint()

    full, fp8, fp8_bf16 = (footprint(torch.float32, torch.float32), footprint(torch.float8_e4m3fn, torch.float32),
                           footprint(torch.float8_e4m3fn, torch.bfloat16))
    assert fp8_bf16 < fp8 < full


@pytest.mark.parametrize("offload", [dict(offload_type="block_level", num_blocks_per_group=1),
                                     dict(offload_type="leaf_level")])
def test_group_offloading_on_the_cpu_alone_and_with_layerwise_casting(offload):
    reference = output(tiny().eval())
    model = tiny().eval()
    model.enable_group_offload(torch.device("cpu"), **offload)
    hooked = [m for m in model.modules() if hasattr(m, "_diffusers_hook")]
    assert hooked and all(m._diffusers_hook.get_hook("group_offloading") is not None for m in hooked)
    torch.testing.assert_close(output(model), reference, rtol=0, atol=1e-5)

    cast = tiny().eval()
    cast.enable_group_offload(torch.device("cpu"), **offload)
    cast.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    assert cosine(output(cast), reference) > 0.99
    assert np.isfinite(output(cast).numpy()).all()
