"""group_norm_silu: the Triton kernels (run on the CPU by Triton's interpreter), the custom op,
torch.compile, and the U-Net with kernels=triton against kernels=torch.

The oracle is plain float64 PyTorch with autograd, on the same (rounded) inputs. Relative error
here is max|a - b| / max|b| over a whole tensor. Every buffer the kernels write starts as NaN, so
an element they fail to write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from gn_diffusion import build_unet, load_config
from gn_diffusion.errors import ConfigError
from gn_diffusion.kernels import group_norm_silu, triton_impl
from gn_diffusion.kernels.ops import group_norm_silu_op
from gn_diffusion.norms import set_kernels

pytest.importorskip("triton")

# Outputs are rounded to the input dtype; Triton's interpreter rounds float32 -> bfloat16 toward
# zero (GPUs round to nearest), so bf16 errors here reach 2^-8 rather than 2^-9.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def interpreted_and_poisoned(monkeypatch):
    """Triton's interpreter on CPU tensors, and NaN in every fresh kernel output."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fresh = triton_impl.new_output
    monkeypatch.setattr(triton_impl, "new_output", lambda *a, **k: fresh(*a, **k).fill_(math.nan))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def oracle(x, weight, bias, groups, eps, scale, shift, silu):
    """float64 GN + AdaGN + SiLU written out with plain ops."""
    n, c = x.shape[:2]
    h = x.reshape(n, groups, -1)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).square().mean(-1, keepdim=True)
    h = ((h - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    spatial = (1,) * (x.dim() - 2)
    if weight is not None:
        h = h * weight.reshape(1, c, *spatial)
    if bias is not None:
        h = h + bias.reshape(1, c, *spatial)
    if scale is not None:
        h = h * (1 + scale.reshape(n, c, *spatial))
    if shift is not None:
        h = h + shift.reshape(n, c, *spatial)
    return h * torch.sigmoid(h) if silu else h


def make_inputs(shape, groups, dtype=torch.float32, *, loc=0.0, spread=1.0, affine=True, adagn=True,
                channels_last=False, seed=0):
    """x (and dy) rounded to dtype; weight/bias/scale/shift float32, non-identity."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    x = (loc + spread * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = dict(
        weight=1 + 0.5 * torch.randn(c, generator=gen) if affine else None,
        bias=0.5 * torch.randn(c, generator=gen) if affine else None,
        scale=0.3 * torch.randn(n, c, generator=gen) if adagn else None,
        shift=0.5 * torch.randn(n, c, generator=gen) if adagn else None,
    )
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, params, dy, groups


def oracle_outputs(x, params, dy, groups, eps, silu):
    leaves = {k: None if v is None else v.double().requires_grad_() for k, v in params.items()}
    x64 = x.double().requires_grad_()
    y = oracle(x64, leaves["weight"], leaves["bias"], groups, eps, leaves["scale"], leaves["shift"], silu)
    wanted = [x64] + [v for v in leaves.values() if v is not None]
    return y.detach(), torch.autograd.grad(y, wanted, dy.double())


def check_kernels(x, params, dy, groups, *, eps=1e-5, silu=True, chunks=None):
    """Forward, saved statistics and all gradients of the kernels against the oracle."""
    p = params
    y, mean, rstd = triton_impl.forward(x, p["weight"], p["bias"], p["scale"], p["shift"], groups, eps, silu, chunks)
    grads = triton_impl.backward(dy, x, p["weight"], p["bias"], p["scale"], p["shift"], mean, rstd, groups, silu,
                                 chunks)
    want_y, want_grads = oracle_outputs(x, params, dy, groups, eps, silu)
    tol = TOLERANCE[x.dtype]
    assert y.dtype == x.dtype and y.stride() == x.stride(), "output keeps x's dtype and memory format"
    assert torch.isfinite(y).all(), "an output element was not written"
    assert relative_error(y, want_y) <= tol
    got = [g for g in grads if g is not None]
    names = ["dx"] + [f"d{k}" for k, v in params.items() if v is not None]
    assert len(got) == len(want_grads)
    assert grads[0].stride() == x.stride()
    for name, g, w in zip(names, got, want_grads):
        assert torch.isfinite(g).all(), f"{name} has unwritten elements"
        assert relative_error(g, w) <= tol, f"{name}: {relative_error(g, w):.2e}"
    groups_x = x.double().reshape(x.shape[0], groups, -1)
    assert relative_error(rstd, 1 / torch.sqrt(groups_x.var(-1, correction=0) + eps)) <= 1e-5
    assert relative_error(mean, (groups_x - groups_x[:, :, :1]).mean(-1)) <= 1e-5
    return y, grads


# (shape, groups, dtype, options, chunks): chunks forces the split path (partials in a workspace)
CASES = {
    "basic": ((2, 8, 5, 7), 4, torch.float32, {}, None),
    "large_mean_small_spread": ((2, 8, 4, 6), 2, torch.float32, dict(loc=1e4, spread=0.1), None),
    "tiny_spread": ((2, 8, 4, 4), 4, torch.float32, dict(spread=1e-4), None),
    "one_channel_per_group": ((2, 4, 6, 6), 4, torch.float32, {}, None),
    "one_group_odd_hw": ((2, 6, 3, 5), 1, torch.float32, {}, None),
    "hw_1": ((3, 16, 1, 1), 2, torch.float32, {}, None),
    "no_adagn": ((2, 8, 5, 5), 2, torch.float32, dict(adagn=False), None),
    "no_affine_no_adagn": ((2, 8, 3, 3), 4, torch.float32, dict(affine=False, adagn=False), None),
    "split_nchw": ((1, 8, 9, 9), 2, torch.float32, {}, 5),
    "split_channels_last_large_mean": ((1, 16, 7, 5), 2, torch.float32,
                                       dict(loc=1e4, spread=0.1, channels_last=True), 3),
    "split_one_channel_per_group": ((1, 2, 11, 13), 2, torch.float32, {}, 4),
    "channels_last": ((2, 16, 5, 3), 4, torch.float32, dict(channels_last=True), None),
    "bf16_channels_last": ((2, 8, 6, 6), 4, torch.bfloat16, dict(channels_last=True), None),
    "bf16_split": ((1, 8, 8, 8), 2, torch.bfloat16, {}, 4),
    "fp16": ((2, 8, 5, 4), 2, torch.float16, {}, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_match_float64_oracle(name):
    shape, groups, dtype, options, chunks = CASES[name]
    x, params, dy, groups = make_inputs(shape, groups, dtype, **options)
    if chunks is not None:
        n, c = shape[:2]
        hw = math.prod(shape[2:])
        plan = triton_impl.plan(n * groups, c // groups, hw, x.stride(1) == 1, x.device, chunks)
        assert not plan.fused, "the case must reach the split path"
    check_kernels(x, params, dy, groups, chunks=chunks)


def test_identity_activation():
    x, params, dy, groups = make_inputs((2, 8, 4, 5), 4, seed=3)
    check_kernels(x, params, dy, groups, silu=False)


def test_large_mean_is_hard_for_a_plain_float32_two_pass():
    """The large-mean case measures something: a float32 (x - mean) / std loses the low bits of the
    mean and is off by far more than the kernels' tolerance, while the kernels stay within it."""
    x, _, _, groups = make_inputs((2, 8, 4, 6), 2, loc=1e4, spread=0.1)
    h = x.reshape(2, groups, -1)
    plain = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, correction=0, keepdim=True) + 1e-5)
    want = oracle(x.double(), None, None, groups, 1e-5, None, None, False).reshape(h.shape)
    assert relative_error(plain, want) > 1e-4
    y, _, _ = triton_impl.forward(x, None, None, None, None, groups, 1e-5, False)
    assert relative_error(y, want.reshape(x.shape)) <= 1e-5


def test_split_path_is_deterministic_and_equals_fused():
    x, params, dy, groups = make_inputs((1, 8, 9, 9), 2, seed=5)
    p = params
    args = (p["weight"], p["bias"], p["scale"], p["shift"])
    runs = []
    for chunks in (4, 4, 1):
        y, mean, rstd = triton_impl.forward(x, *args, groups, 1e-5, True, chunks)
        runs.append((y, *triton_impl.backward(dy, x, *args, mean, rstd, groups, True, chunks)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), "same inputs, same bits"
    assert all(relative_error(a, b) <= 1e-6 for a, b in zip(runs[0], runs[2]))


def test_default_plan_splits_small_batches_and_fuses_large_ones():
    cpu = torch.device("cpu")
    small = triton_impl.plan(groups=2, cg=8, hw=64, channels_inner=False, device=cpu)
    large = triton_impl.plan(groups=64, cg=8, hw=64, channels_inner=False, device=cpu)
    assert small.chunks > 1 and 2 * small.chunks >= triton_impl.CPU_PROGRAMS
    assert large.fused


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "reference"])
def test_custom_op_gradients_and_registration(use_triton):
    x, params, dy, groups = make_inputs((2, 8, 4, 4), 4, seed=7)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    xg = x.clone().requires_grad_()
    y, mean, rstd = group_norm_silu_op(xg, *leaves.values(), groups, 1e-5, True, use_triton)
    assert mean.shape == rstd.shape == (2, groups) and mean.dtype == torch.float32
    got = torch.autograd.grad(y, [xg, *leaves.values()], dy)
    want_y, want = oracle_outputs(x, params, dy, groups, 1e-5, True)
    assert relative_error(y, want_y) <= 1e-5
    for g, w in zip(got, want):
        assert relative_error(g, w) <= 1e-5
    torch.library.opcheck(group_norm_silu_op, (xg, *leaves.values(), groups, 1e-5, True, use_triton),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_public_function_on_cpu():
    x, params, _, groups = make_inputs((1, 8, 6, 6), 2, channels_last=True, seed=9)
    p = params
    want = oracle(x.double(), p["weight"].double(), p["bias"].double(), groups, 1e-5,
                  p["scale"].double(), p["shift"].double(), True)
    for backend in ("auto", "torch", "triton"):  # auto on a CPU tensor is the reference
        y = group_norm_silu(x, p["weight"], p["bias"], groups, 1e-5, scale=p["scale"], shift=p["shift"],
                            backend=backend)
        assert relative_error(y, want) <= 1e-5, backend
    with pytest.raises(ValueError, match="divisible"):
        group_norm_silu(x, None, None, 3)


def test_triton_kernels_on_a_machine_without_cuda_are_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        load_config("configs/digits.yaml", ["model.kernels=triton"])
    x = torch.randn(1, 4, 2, 2)
    with pytest.raises(ConfigError, match="model.kernels=auto"):
        group_norm_silu(x, None, None, 2, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert load_config("configs/digits.yaml", ["model.kernels=triton"]).model.kernels == "triton"


def test_triton_kernels_with_training_forced_onto_the_cpu_are_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert load_config("configs/digits.yaml", ["model.kernels=triton"]).model.kernels == "triton"
    with pytest.raises(ConfigError, match="on cpu, not CUDA"):
        load_config("configs/digits.yaml", ["model.kernels=triton", "train.cpu=true"])


def tiny_digits_unet():
    cfg = load_config("configs/digits.yaml", ["model.base_channels=8", "model.groups=4", "model.num_res_blocks=1"])
    torch.manual_seed(0)
    model = build_unet(cfg.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # wake the zero-initialized output layers so every layer gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def outputs_and_grads(model, x, t):
    model.zero_grad()
    y = model(x, t).sample
    y.square().mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


def test_unet_with_triton_kernels_matches_torch_and_compiles():
    """kernels=triton (interpreted) against kernels=torch, then torch.compile(fullgraph) of the
    model with the custom op against eager: outputs and every parameter gradient."""
    model = tiny_digits_unet()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 800])
    set_kernels(model, "torch")
    want_y, want_grads = outputs_and_grads(model, x, t)
    set_kernels(model, "triton")
    y, grads = outputs_and_grads(model, x, t)
    assert relative_error(y, want_y) <= 1e-5
    assert max(relative_error(g, w) for g, w in zip(grads, want_grads)) <= 1e-4
    compiled = torch.compile(model, fullgraph=True)
    cy, cgrads = outputs_and_grads(compiled, x, t)
    assert relative_error(cy, y) <= 1e-5
    assert max(relative_error(g, w) for g, w in zip(cgrads, grads)) <= 1e-4


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "one_channel_per_group"])
def test_kernels_compile_for_a_hopper_gpu(layout):
    """Ahead-of-time compilation for sm_90 (no GPU needed) catches what the interpreter does not:
    type errors in the GPU front end (also where the launcher turns sizes equal to 1 into
    constants), and (NCHW) loads that are not 16 bytes wide."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    import triton

    k = triton_impl._load_kernels(interpret=False)
    unit_stride = "stride_c" if layout == "channels_last" else "stride_p"
    ones = dict(Cg=1, CB=1, S=1) if layout == "one_channel_per_group" else {}
    sizes = dict(BLOCK_C=8, BLOCK_P=256) if layout == "nchw" else dict(BLOCK_C=16, BLOCK_P=64)
    flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, SILU=True)
    kernels = [(k.fwd_stats_kernel, {}), (k.bwd_reduce_kernel, flags)] + [
        (kernel, dict(FUSED=fused, BLOCK_K=4, BLOCK_S=4, **flags))
        for kernel in (k.fwd_apply_kernel, k.bwd_dx_kernel) for fused in (True, False)]
    for kernel, options in kernels:
        constants = {name: value for name, value in {**sizes, **options, **ones, unit_stride: 1}.items()
                     if name in kernel.arg_names}
        signature, aligned = {}, {}
        for i, name in enumerate(kernel.arg_names):
            if name in constants:
                signature[name] = "constexpr"
            elif name.endswith(("_ptr", "_out")):
                signature[name] = "*bf16" if name in ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr") else "*fp32"
                aligned[(i,)] = [["tt.divisibility", 16]]  # as the launcher specializes aligned tensors
            else:
                signature[name] = "fp32" if name == "eps" else "i32"
                if name in ("HW", "PPS", "stride_n", "stride_c", "stride_p"):  # e.g. HW = 1024
                    aligned[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(kernel, signature, constants, aligned),
                                  target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        ptx = compiled.asm["ptx"]
        assert ".entry" in ptx
        if layout == "nchw" and kernel in (k.fwd_apply_kernel, k.bwd_dx_kernel):
            assert "ld.global.v4" in ptx, f"{kernel.__name__}: x is not read in 16-byte loads"
