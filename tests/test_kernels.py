"""group_norm_silu: the Triton kernels (on the CPU under Triton's interpreter, natively where a
CUDA device exists), the eager autograd.Function and the torch.compile custom op, and a tiny U-Net
with backend=triton against backend=torch.

The oracle is plain float64 PyTorch with autograd, on the same (rounded) inputs. Relative error
here is max|a - b| / max|b| over a whole tensor. Every buffer the kernels write starts as NaN, so
an element they fail to write fails the comparison.
"""

from __future__ import annotations

import math

import pytest
import torch

from gn_diffusion import build_unet, load_config
from gn_diffusion.config import RuntimeConfig
from gn_diffusion.errors import ConfigError
from gn_diffusion.kernels import check_layer, group_norm_silu, triton_impl, use_triton
from gn_diffusion.kernels.function import GroupNormSiLUFunction
from gn_diffusion.kernels.ops import group_norm_silu_op
from gn_diffusion.model.norms import GroupNorm32

pytest.importorskip("triton")

# Outputs are rounded to the input dtype; Triton's interpreter rounds float32 -> bfloat16 toward
# zero (GPUs round to nearest), so bf16 errors here reach 2^-8 rather than 2^-9.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
PARAMS = ("weight", "bias", "scale", "shift")

# Where the kernels run: the interpreter on CPU tensors everywhere, compiled kernels on a GPU.
TARGETS = [
    pytest.param("interpreter"),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.fixture(autouse=True)
def interpreted_and_poisoned(monkeypatch):
    """Triton's interpreter (unless a test asks for CUDA), and NaN in every fresh kernel output."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fresh = triton_impl.new_output
    monkeypatch.setattr(triton_impl, "new_output", lambda *a, **k: fresh(*a, **k).fill_(math.nan))


@pytest.fixture(params=TARGETS)
def device(request, monkeypatch) -> torch.device:
    if request.param == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET")
        return torch.device("cuda")
    return torch.device("cpu")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max()).item()


def oracle(x, weight, bias, groups, eps, scale, shift, act):
    """float64 GN + AdaGN + SiLU written out with plain ops."""
    n, c = x.shape[:2]
    h = x.reshape(n, groups, -1)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).square().mean(-1, keepdim=True)
    h = ((h - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    per_channel = lambda t: t.reshape(-1, c, *(1,) * (x.dim() - 2))  # noqa: E731  [C] or [N, C] against x
    h = h if weight is None else h * per_channel(weight)
    h = h if bias is None else h + per_channel(bias)
    h = h if scale is None else h * (1 + per_channel(scale))
    h = h if shift is None else h + per_channel(shift)
    return h * torch.sigmoid(h) if act else h


def make_inputs(shape, groups, dtype=torch.float32, *, loc=0.0, spread=1.0, affine=True, adagn=True,
                channels_last=False, strided=False, seed=0, device="cpu"):
    """x (and dy) rounded to dtype; weight/bias/scale/shift float32, non-identity. `strided` makes
    x a non-contiguous view (every other column of a wider tensor)."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    wide = (*shape[:-1], 2 * shape[-1]) if strided else shape
    x = (loc + spread * torch.randn(wide, generator=gen, dtype=torch.float64)).to(dtype).to(device)
    x = x[..., ::2] if strided else x
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = dict(weight=1 + 0.5 * torch.randn(c, generator=gen), bias=0.5 * torch.randn(c, generator=gen),
                  scale=0.3 * torch.randn(n, c, generator=gen), shift=0.5 * torch.randn(n, c, generator=gen))
    kept = dict(weight=affine, bias=affine, scale=adagn, shift=adagn)
    params = {k: v.to(device) if kept[k] else None for k, v in params.items()}
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return x, params, dy, groups


def oracle_outputs(x, params, dy, groups, eps, act):
    leaves = {k: None if v is None else v.detach().double().cpu().requires_grad_() for k, v in params.items()}
    x64 = x.detach().double().cpu().requires_grad_()
    y = oracle(x64, *(leaves[k] for k in ("weight", "bias")), groups, eps, leaves["scale"], leaves["shift"], act)
    wanted = [x64] + [v for v in leaves.values() if v is not None]
    return y.detach(), torch.autograd.grad(y, wanted, dy.double().cpu())


def through_autograd(path, x, params, dy, groups, eps=1e-5, act=True):
    """By autograd through `path`, "function" (the eager autograd.Function) or "custom_op" (what
    torch.compile traces): y, the gradients of x and of every present parameter, mean and rstd."""
    xg = x.detach().clone().requires_grad_()
    leaves = [None if params[k] is None else params[k].detach().clone().requires_grad_() for k in PARAMS]
    if path == "function":
        y = GroupNormSiLUFunction.apply(xg, *leaves, groups, eps, act)
        mean, rstd = y.grad_fn.saved_tensors[-2:]
    else:
        y, mean, rstd = group_norm_silu_op(xg, *leaves, groups, eps, act, True)
    grads = torch.autograd.grad(y, [xg] + [t for t in leaves if t is not None], dy)
    return y.detach(), grads, mean, rstd


def check_kernels(x, params, dy, groups, *, eps=1e-5, act=True, chunks=None):
    """Forward, saved statistics and all gradients (dparameters reduced in the kernels) against
    the oracle: through the autograd.Function, or with forced `chunks` through the host functions
    (the Function takes the default plan)."""
    p = [params[k] for k in PARAMS]
    if chunks is None:
        y, got, mean, rstd = through_autograd("function", x, params, dy, groups, eps, act)
    else:
        y, mean, rstd = triton_impl.forward(x, *p, groups, eps, act, chunks)
        grads = triton_impl.backward(dy, x, *p, mean, rstd, groups, act, chunks)
        assert [g is None for g in grads[1:]] == [t is None for t in p], "absent tensors get no gradient"
        got = [g for g in grads if g is not None]
    want_y, want_grads = oracle_outputs(x, params, dy, groups, eps, act)
    tol = TOLERANCE[x.dtype]
    assert y.dtype == x.dtype, "output keeps x's dtype"
    assert y.stride() == got[0].stride() == triton_impl.dense_layout(x)[0].stride(), "x's memory format"
    assert torch.isfinite(y).all(), "an output element was not written"
    assert relative_error(y, want_y) <= tol
    names = ["dx"] + [f"d{k}" for k in PARAMS if params[k] is not None]
    likes = [x] + [t for t in p if t is not None]
    assert len(got) == len(want_grads)
    for name, g, w, like in zip(names, got, want_grads, likes):
        assert g.dtype == like.dtype and g.shape == like.shape, name
        assert torch.isfinite(g).all(), f"{name} has unwritten elements"
        assert relative_error(g, w) <= tol, f"{name}: {relative_error(g, w):.2e}"
    groups_x = x.detach().double().cpu().reshape(x.shape[0], groups, -1)
    assert relative_error(rstd, 1 / torch.sqrt(groups_x.var(-1, correction=0) + eps)) <= 1e-5
    assert relative_error(mean, (groups_x - groups_x[:, :, :1]).mean(-1)) <= 1e-5


# (shape, groups, dtype, options, chunks): chunks forces the split path (partials in a workspace);
# on the CPU, batches of fewer than triton_impl.CPU_PROGRAMS groups take it by default too.
CASES = {
    "basic": ((2, 8, 5, 7), 4, torch.float32, {}, None),
    "large_mean_small_spread": ((2, 8, 4, 6), 2, torch.float32, dict(loc=1e4, spread=0.1), None),
    "tiny_spread": ((2, 8, 4, 4), 4, torch.float32, dict(spread=1e-4), None),
    "one_channel_per_group": ((2, 4, 6, 6), 4, torch.float32, {}, None),
    "one_group_odd_hw": ((2, 6, 3, 5), 1, torch.float32, {}, None),
    "hw_1": ((3, 16, 1, 1), 2, torch.float32, {}, None),
    "no_adagn": ((2, 8, 5, 5), 2, torch.float32, dict(adagn=False), None),
    "no_affine_no_adagn": ((2, 8, 3, 3), 4, torch.float32, dict(affine=False, adagn=False), None),
    "non_contiguous": ((2, 8, 3, 5), 4, torch.float32, dict(strided=True), None),
    "split_default_plan": ((1, 8, 9, 9), 2, torch.float32, {}, None),
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
def test_kernels_match_float64_oracle(name, device):
    shape, groups, dtype, options, chunks = CASES[name]
    x, params, dy, groups = make_inputs(shape, groups, dtype, device=device, **options)
    if name.startswith("split"):
        n, c = shape[:2]
        cpu = torch.device("cpu")  # the plan the interpreter gets; a GPU splits small batches further
        plan = triton_impl.launch_plan(n * groups, c // groups, math.prod(shape[2:]), x.stride(1) == 1, cpu, chunks)
        assert not plan.fused, "the case must reach the split path"
    check_kernels(x, params, dy, groups, chunks=chunks)


def test_identity_activation(device):
    x, params, dy, groups = make_inputs((2, 8, 4, 5), 4, seed=3, device=device)
    check_kernels(x, params, dy, groups, act=False)


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


def test_split_path_is_deterministic_and_equals_fused(device):
    """Same inputs, same bits (no atomics, parameter gradients included), and the split path
    agrees with one program per group."""
    x, params, dy, groups = make_inputs((2, 4, 6, 6), 2, seed=5, device=device)
    p = [params[k] for k in PARAMS]
    runs = []
    for chunks in (2, 2, 1):
        y, mean, rstd = triton_impl.forward(x, *p, groups, 1e-5, True, chunks)
        runs.append((y, *triton_impl.backward(dy, x, *p, mean, rstd, groups, True, chunks)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), "same inputs, same bits"
    assert all(relative_error(a, b) <= 1e-6 for a, b in zip(runs[0], runs[2]))


def test_default_plan_splits_small_batches_fuses_large_ones_and_is_cached_per_shape():
    cpu = torch.device("cpu")
    small = triton_impl.launch_plan(groups=2, cg=8, hw=64, channels_inner=False, device=cpu)
    large = triton_impl.launch_plan(groups=64, cg=8, hw=64, channels_inner=False, device=cpu)
    assert small.chunks > 1 and 2 * small.chunks >= triton_impl.CPU_PROGRAMS
    assert large.fused
    x, params, dy, groups = make_inputs((2, 8, 3, 3), 4, seed=2)
    y, mean, rstd = triton_impl.forward(x, *(params[k] for k in PARAMS), groups, 1e-5, True)
    before = triton_impl.launch_for.cache_info()
    triton_impl.backward(dy, x, *(params[k] for k in PARAMS), mean, rstd, groups, True)
    after = triton_impl.launch_for.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 0)


def test_function_and_custom_op_give_the_same_bits(device):
    """The eager path (autograd.Function) and the traced one (custom op) run the same kernels."""
    x, params, dy, groups = make_inputs((2, 16, 5, 3), 2, channels_last=True, seed=11, device=device)
    function = through_autograd("function", x, params, dy, groups)
    custom_op = through_autograd("custom_op", x, params, dy, groups)
    for a, b in zip(function, custom_op):
        assert all(torch.equal(u, v) for u, v in zip(a, b)) if isinstance(a, tuple) else torch.equal(a, b)


def test_layer_checks_when_built_and_runs_the_function_in_eager_mode():
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm32(3, 8)
    norm = GroupNorm32(2, 8, backend="triton")
    x, emb = torch.randn(2, 8, 3, 3, requires_grad=True), torch.randn(2, 16, requires_grad=True)
    y = norm(x, *emb.chunk(2, dim=1), act=True)
    assert type(y.grad_fn).__name__ == "GroupNormSiLUFunctionBackward"
    y.sum().backward()
    assert all(t.grad is not None for t in (x, emb, norm.weight, norm.bias))


@pytest.mark.parametrize("use_triton_kernels", [True, False], ids=["triton", "torch"])
def test_custom_op_gradients_and_registration(use_triton_kernels):
    x, params, dy, groups = make_inputs((2, 8, 4, 4), 2, seed=7)
    xg, *leaves = (t.clone().requires_grad_() for t in (x, *params.values()))
    y, mean, rstd = group_norm_silu_op(xg, *leaves, groups, 1e-5, True, use_triton_kernels)
    assert mean.shape == rstd.shape == (2, groups) and mean.dtype == torch.float32
    assert not mean.requires_grad and not rstd.requires_grad
    got = torch.autograd.grad(y, [xg, *leaves], dy)
    want_y, want = oracle_outputs(x, params, dy, groups, 1e-5, True)
    assert relative_error(y, want_y) <= 1e-5 and max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-5
    torch.library.opcheck(group_norm_silu_op, (xg, *leaves, groups, 1e-5, True, use_triton_kernels),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_public_function_on_cpu():
    x, params, _, groups = make_inputs((1, 8, 6, 6), 2, channels_last=True, seed=9)
    p = params
    want = oracle(x.double(), p["weight"].double(), p["bias"].double(), groups, 1e-5,
                  p["scale"].double(), p["shift"].double(), True)
    for backend in ("auto", "torch", "triton"):  # auto on a CPU tensor is the PyTorch path
        y = group_norm_silu(x, p["weight"], p["bias"], groups, 1e-5, scale=p["scale"], shift=p["shift"],
                            backend=backend)
        assert relative_error(y, want) <= 1e-5, backend
    with pytest.raises(ValueError, match="divisible"):
        group_norm_silu(x, None, None, 3)
    with pytest.raises(ValueError, match="backend"):
        group_norm_silu(x, None, None, 2, backend="cuda")


def test_backend_decision_and_its_config_errors(monkeypatch):
    """use_triton decides. Asking for triton where it cannot run is a ConfigError naming
    runtime.backend: when the model is built on a machine without CUDA, and when called with CPU
    tensors on a machine with CUDA."""
    x = torch.randn(1, 4, 2, 2)
    assert use_triton("triton", x) and not use_triton("torch", x) and not use_triton("auto", x)
    model_cfg = load_config(None, ["model.base_channels=8", "model.groups=4"]).model
    build_unet(model_cfg, RuntimeConfig(backend="triton"))  # the interpreter counts
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="runtime.backend=auto"):
        build_unet(model_cfg, RuntimeConfig(backend="triton"))
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        group_norm_silu(x, None, None, 2, backend="triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_layer(4, 2, "triton")
    with pytest.raises(ConfigError, match="runtime.backend is 'triton' but the tensors are on cpu, not CUDA"):
        use_triton("triton", x)


def adagn_layer(backend: str, channels=8, groups=4) -> GroupNorm32:
    norm = GroupNorm32(groups, channels, backend=backend)
    with torch.no_grad():  # non-identity, so the affine's gradients through SiLU are checked
        norm.weight.copy_(torch.linspace(0.5, 1.5, channels))
        norm.bias.copy_(torch.linspace(-0.5, 0.5, channels))
    return norm


def test_compiled_norm_matches_eager(monkeypatch):
    """Inductor, fullgraph, over one AdaGN norm call, forward and backward: the custom op node
    gives the eager autograd.Function's numbers."""
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start for one graph
    norm = adagn_layer("triton")
    gen = torch.Generator().manual_seed(4)
    x, scale, shift, dy = (torch.randn(shape, generator=gen) for shape in ((2, 8, 4, 4), (2, 8), (2, 8), (2, 8, 4, 4)))

    def outputs(fn):
        leaves = [t.clone().requires_grad_() for t in (x, scale, shift)]
        y = fn(*leaves)
        return y.detach(), torch.autograd.grad(y, [*leaves, norm.weight, norm.bias], dy)

    def f(x, scale, shift):
        return norm(x, scale, shift, act=True)

    want_y, want = outputs(f)
    torch._dynamo.reset()
    y, got = outputs(torch.compile(f, fullgraph=True))
    assert relative_error(y, want_y) <= 1e-6
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-6


def test_norm_traces_without_graph_breaks():
    norms = [adagn_layer(backend) for backend in ("torch", "triton")]

    def f(x, emb):
        scale, shift = emb.chunk(2, dim=1)
        return norms[1](norms[0](x, scale, shift, act=True), scale, shift, act=False)

    explanation = torch._dynamo.explain(f)(torch.randn(2, 8, 4, 4), torch.randn(2, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_tiny_unet_with_triton_matches_torch():
    """backend=triton (interpreted) against backend=torch on a tiny U-Net: outputs and every
    parameter gradient."""
    model_cfg = load_config(None, ["model.image_size=4", "model.base_channels=8", "model.groups=2",
                                   "model.num_res_blocks=1", "model.channel_mult=[1]",
                                   "model.attention_resolutions=[]"]).model
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = build_unet(model_cfg, RuntimeConfig(backend=backend))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # wake the zero-initialized output layers so every layer gets a gradient
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        x, t = torch.randn(2, 1, 4, 4, generator=gen), torch.tensor([5, 800])
        y = model(x, t).sample
        y.square().mean().backward()
        results.append((y.detach(), [p.grad for p in model.parameters()]))
    (want_y, want), (y, got) = results
    assert relative_error(y, want_y) <= 1e-5
    assert max(relative_error(g, w) for g, w in zip(got, want)) <= 1e-4


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
    flags = dict(HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, ACT=True)
    kernels = [(k.fwd_stats_kernel, {}), (k.bwd_reduce_kernel, flags)]
    if layout == "nchw":  # its [N, C] sums are laid out alike for every layout of x
        kernels.append((k.param_grads_kernel, dict(BLOCK_N=32, **flags)))
    kernels += [(kernel, dict(FUSED=fused, BLOCK_K=4, BLOCK_S=4, **flags))
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
