"""The foundation: every norm kind in the U-Net, batch independence, float32 statistics,
parameter count, diffusers round-trips."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler

from gn_diffusion import GNUNet, build_unet, load_config, make_norm

NORMS = ["group", "batch", "sync_batch", "layer", "instance", "none"]


def digits_unet(**overrides) -> GNUNet:
    cfg = load_config("configs/digits.yaml", [f"model.{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_unet(cfg.model)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Give the zero-initialized output layers weights so the model's output depends on its input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_builds_trains_and_starts_at_zero(norm):
    model = digits_unet(norm=norm).train()
    x = torch.randn(4, 1, 16, 16)
    t = torch.tensor([0, 10, 500, 999])
    out = model(x, t).sample
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out)), "zero-initialized output conv must give exact zeros"

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = F.mse_loss(model(x, t).sample, torch.randn_like(x))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "conv_out.weight" in changed
    assert model(x, t).sample.abs().sum() > 0


@pytest.mark.parametrize("norm,independent", [
    ("group", True), ("layer", True), ("instance", True), ("batch", False),
])
def test_per_sample_norms_do_not_mix_the_batch(norm, independent):
    model = digits_unet(norm=norm, dropout=0.0).train()
    perturb(model)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 1, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    with torch.no_grad():
        batched = model(x, t).sample[3]
        alone = model(x[3:4], t[3:4]).sample[0]
    same = torch.allclose(batched, alone, rtol=1e-4, atol=1e-5)
    assert same == independent, (norm, (batched - alone).abs().max().item())


@pytest.mark.parametrize("kind", ["group", "layer", "instance"])
def test_group_statistics_are_float32_under_bf16_autocast(kind):
    norm = make_norm(kind, 64, groups=32)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.2)
    gen = torch.Generator().manual_seed(0)
    x = (1e3 + torch.randn(2, 64, 8, 8, generator=gen)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    ref = F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps)
    # float32 statistics leave only the final rounding to bf16: half an ulp, 2**-8 relative.
    err = (y.double() - ref).abs()
    assert (err <= ref.abs() * 2**-8 + 1e-5).all(), err.max().item()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cifar10_config_matches_the_ddpm_parameter_count():
    cfg = load_config("configs/cifar10.yaml", ["model.scale_shift=false"])
    n = count_parameters(build_unet(cfg.model))
    assert abs(n - 35.7e6) / 35.7e6 <= 0.005, n
    with_scale_shift = count_parameters(build_unet(load_config("configs/cifar10.yaml").model))
    assert with_scale_shift > n  # AdaGN projects twice the channels from the embedding


def test_class_conditional_model_uses_labels_and_a_null_class():
    model = digits_unet(num_classes=10).eval()
    perturb(model)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([50, 50])
    with torch.no_grad():
        a = model(x, t, class_labels=torch.tensor([1, 1])).sample
        b = model(x, t, class_labels=torch.tensor([7, 7])).sample
        null = model(x, t).sample
        explicit_null = model(x, t, class_labels=torch.tensor([10, 10])).sample
    assert not torch.allclose(a, b)
    assert torch.equal(null, explicit_null)
    assert model.class_embed.num_embeddings == 11


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = digits_unet(), digits_unet(gradient_checkpointing=True)
    for model in (plain, checkpointed):
        perturb(model)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model(x, t).sample.square().sum().backward()
        grads.append(model.conv_in.weight.grad)
    assert checkpointed.gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


def test_save_pretrained_round_trip_is_bit_identical(tmp_path):
    model = digits_unet(num_classes=10).eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = GNUNet.from_pretrained(tmp_path).eval()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 400, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)


def test_ddim_pipeline_runs_our_model():
    model = digits_unet().eval()
    perturb(model)
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 1)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
