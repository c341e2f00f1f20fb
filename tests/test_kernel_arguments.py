"""group_norm_silu's arguments as F.group_norm takes them: torch's own OpInfo and ModuleInfo
samples for group_norm (act=False) on both backends, the Triton one interpreted, against F.group_norm
in float64; what torch refuses we refuse; empty inputs give what torch gives; and whoever calls
the kernels (a layer too), they never index a tensor out of its bounds.

Errors are compared as test_kernels compares them, max |a - b| over max |b| of a whole tensor
(over at least 0.01: a gradient that cancels to almost zero, as dx of a two-element group does, is
float32 noise), with NaN required where the oracle has NaN (torch's weight gradient over empty
groups).
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from gn_diffusion.kernels import ArgumentError, group_norm_silu, group_norm_silu_torch, triton_impl
from gn_diffusion.kernels.ops import group_norm_silu_op
from gn_diffusion.model.norms import GroupNorm32
# Fixtures of test_kernels: Triton's interpreter and NaN in every fresh kernel output (autouse);
# `device`, the interpreter on CPU tensors or compiled kernels on CUDA.
from test_kernels import device, interpreted_and_poisoned, oracle  # noqa: F401

BACKENDS = ("torch", "triton")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@functools.cache
def torch_group_norm_infos():
    """torch's OpInfo for F.group_norm and ModuleInfo for nn.GroupNorm, imported without the
    process-wide state the import changes for every later test in this process: it freezes
    torch.backends' flags (so the runtime's cudnn.benchmark would raise), sets
    TORCHINDUCTOR_CACHE_DIR and adds warning filters. Imported by the first test that needs it,
    not at collection: every xdist worker collects every file, and the import costs seconds."""
    env = dict(os.environ)
    with warnings.catch_warnings():
        from torch.testing._internal.common_methods_invocations import op_db
        from torch.testing._internal.common_modules import module_db
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
    # undo disable_global_flags(): the flag lives in the globals of torch.backends' functions
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()
    return (next(op for op in op_db if op.name == "nn.functional.group_norm"),
            next(m for m in module_db if m.module_cls is torch.nn.GroupNorm))


def tolerance(dtype: torch.dtype, backend: str) -> float:
    """Relative error allowed: outputs are rounded to x's dtype, statistics are float32 (float64
    for a float64 x on the torch backend; the Triton kernels keep float32)."""
    if dtype == torch.float64:
        return 1e-12 if backend == "torch" else 1e-5
    return {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}[dtype]


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert got.shape == want.shape, what
    got, want = got.detach().double(), want.detach()
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN where torch has none, or none where it has"
    if (~nan).any():
        error = (got[~nan] - want[~nan]).abs().max() / want[~nan].abs().max().clamp(min=1e-2)
        assert error <= tol, f"{what}: relative error {error:.2e} > {tol:.0e}"


def gradients(y, tensors, dy):
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(y, leaves, dy) if leaves else ()


def check_against_float64(ours, reference, x, params, tol, what, dy_seed=0):
    """ours(x, *params) against reference on float64 copies: the output and, where x or a
    parameter requires grad, every gradient."""
    as64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in (x, *params)]
    want = reference(*as64)
    y = ours(x, *params)
    assert y.dtype == x.dtype, what
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype).to(y.device)
    assert_close(y, want, tol, what)
    got_grads, want_grads = gradients(y, (x, *params), dy), gradients(want, as64, dy.double())
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(g, w, tol, f"{what}: gradient {i}")


def sample_cases(device: torch.device):
    """(name, dtype, sample) of torch's group_norm samples: every sample in every dtype, but on the
    interpreter (slow) one sample of each of the first four shapes, its weight/bias combination
    and dtype turning with the shape, and the sample without options."""
    cases = []
    for k, dtype in enumerate(DTYPES):
        samples = list(torch_group_norm_infos()[0].sample_inputs(device.type, dtype, requires_grad=True))
        assert len(samples) == 21, "five shapes, four weight/bias combinations each, one without options"
        for i, sample in enumerate(samples):
            shape, combination = divmod(i, 4)
            if device.type != "cpu" or combination == shape == k or (i == 20 and k == 0):
                cases.append((f"sample {i} {dtype}: x {tuple(sample.input.shape)}", dtype, sample))
    return cases


def check_sample(name, dtype, sample, backend):
    groups, eps = sample.args[0], sample.kwargs.get("eps", 1e-5)
    weight, bias = sample.kwargs.get("weight"), sample.kwargs.get("bias")
    check_against_float64(
        lambda x, w, b: group_norm_silu(x, w, b, groups, eps, act=False, backend=backend),
        lambda x, w, b: F.group_norm(x, groups, w, b, eps), sample.input, (weight, bias),
        tolerance(dtype, backend), f"{name}, {groups} groups")


def test_torch_sample_inputs_match_float64_group_norm_on_the_torch_backend():
    for case in sample_cases(torch.device("cpu")):
        check_sample(*case, "torch")


def test_torch_sample_inputs_match_float64_group_norm_through_the_kernels(device):
    cases = sample_cases(device)
    assert {dtype for _, dtype, _ in cases} == set(DTYPES)
    for case in cases:
        check_sample(*case, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_error_inputs_are_refused_as_torch_refuses_them(backend):
    errors = list(torch_group_norm_infos()[0].error_inputs("cpu"))
    assert errors
    for error in errors:
        sample = error.sample_input
        with pytest.raises(error.error_type, match=error.error_regex):
            F.group_norm(sample.input, *sample.args, **sample.kwargs)
        with pytest.raises(error.error_type, match=error.error_regex):
            group_norm_silu(sample.input, None, None, *sample.args, act=False, backend=backend)


def test_torch_module_inputs_through_the_function_and_the_layer(device):
    """nn.GroupNorm's ModuleInfo samples: our function with the module's parameters, and our
    layer built with the same arguments (its unchecked path), against the float64 module; with
    float32 parameters beside a bfloat16 x too, as under autocast. The torch backend runs on the
    CPU; the interpreter (slow) takes the layer alone on the bfloat16 samples of at most 4 groups
    in all (the function meets every sample's kind of call above)."""
    interpreted = device.type == "cpu"
    info = torch_group_norm_infos()[1]
    for backend in BACKENDS if interpreted else ("triton",):
        for dtype in (torch.float32, torch.bfloat16):
            for sample in info.module_inputs_func(info, device.type, dtype, requires_grad=True, training=True):
                args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
                (x,) = sample.forward_input.args
                if backend == "triton" and interpreted and (dtype != torch.bfloat16 or x.shape[0] * args[0] > 4):
                    continue
                check_module_sample(args, kwargs, x, backend, f"{backend}: {sample.desc} {dtype}",
                                    through_the_function=not (backend == "triton" and interpreted))


def check_module_sample(args, kwargs, x, backend, what, through_the_function=True):
    torch.manual_seed(0)
    module = torch.nn.GroupNorm(*args, **kwargs)
    layer = GroupNorm32(*args, **kwargs, backend=backend)
    with torch.no_grad():  # non-identity parameters, the layer's a copy of the module's
        for p, q in zip(module.parameters(), layer.parameters()):
            q.copy_(p.uniform_(-2, 2))
    module, layer = module.to(x.device, torch.float64), layer.to(x.device)  # the layer's stay float32
    tol = tolerance(x.dtype, backend)
    check_against_float64(lambda x: layer(x), module, x, (), tol, f"layer, {what}")
    if not through_the_function:
        return
    check_against_float64(
        lambda x, w, b: group_norm_silu(x, w, b, module.num_groups, module.eps, act=False, backend=backend),
        lambda x, w, b: F.group_norm(x, module.num_groups, w, b, module.eps), x,
        [None if p is None else p.detach().to(x.dtype).requires_grad_() for p in (module.weight, module.bias)],
        tol, f"function, {what}")


def test_torch_module_error_inputs_are_refused_by_the_layer():
    info = torch_group_norm_infos()[1]
    errors = list(info.module_error_inputs_func(info, "cpu", torch.float32, requires_grad=False, training=True))
    assert errors
    for error in errors:
        args = error.module_error_input.constructor_input.args
        with pytest.raises(error.error_type, match=error.error_regex):
            GroupNorm32(*args)


def mismatched(x):
    """(what, weight, bias, scale, shift) that F.group_norm (for weight and bias) refuses for x."""
    n, c = x.shape[:2]
    w = torch.randn(c)
    return [
        ("weight", torch.randn(c // 2), None, None, None), ("weight", torch.randn(2 * c), None, None, None),
        ("weight", torch.randn(c, 1), None, None, None), ("weight", torch.tensor(1.0), None, None, None),
        ("bias", w, torch.randn(c - 1), None, None),
        ("weight", w.double(), None, None, None), ("weight", w.to(torch.int64), None, None, None),
        ("bias", w, w.bfloat16(), None, None), ("weight", torch.ones(c, device="meta"), None, None, None),
        ("scale", None, None, torch.randn(n, c // 2), None), ("shift", None, None, None, torch.randn(c)),
        ("scale", None, None, torch.randn(n, c).to(torch.int32), None),
        ("shift", None, None, None, torch.randn(n, c, device="meta")),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_parameters_are_refused_with_a_sentence_naming_them(backend):
    """A weight of 3 values for 6 channels was read past its end by the Triton kernels."""
    x = torch.randn(2, 6, 4)
    for name, weight, bias, scale, shift in mismatched(x):
        if scale is None and shift is None:
            with pytest.raises(RuntimeError):
                F.group_norm(x, 2, weight, bias)
        with pytest.raises(ArgumentError, match=rf"\b{name}\b"):
            group_norm_silu(x, weight, bias, 2, scale=scale, shift=shift, backend=backend)
    for groups in (0, -2):  # 0 was a ZeroDivisionError
        with pytest.raises(ArgumentError, match="num_groups must be at least 1"):
            group_norm_silu(x, None, None, groups, backend=backend)
        with pytest.raises(ArgumentError, match="num_groups must be at least 1"):
            GroupNorm32(groups, 6, backend=backend)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        group_norm_silu(x, None, None, 2.0, backend=backend)
    with pytest.raises(ArgumentError, match="floating-point"):
        group_norm_silu(x.to(torch.int64), None, None, 2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_act_is_a_bool_and_the_old_spellings_are_refused(backend):
    """The old spellings ("silu", None), and anything else that is not a bool, are refused with a
    sentence saying what act is: a truthiness test would take act="none" for the SiLU."""
    x = torch.randn(2, 6, 4)
    for act in ("silu", None, "none", 1, torch.tensor(True)):
        with pytest.raises(TypeError, match=r"act must be a bool \(True: SiLU, False: no activation\), got"):
            group_norm_silu(x, None, None, 2, act=act, backend=backend)
    with pytest.raises(TypeError, match="act must be a bool.*got str 'silu'"):
        group_norm_silu_torch(x, None, None, 2, act="silu")
    assert torch.equal(group_norm_silu(x, None, None, 2, backend=backend),
                       group_norm_silu(x, None, None, 2, act=True, backend=backend))


def test_a_layer_never_lets_the_kernels_read_out_of_bounds():
    """A layer's calls skip the public checks; the Triton path still refuses an x of other
    channels than its weight, and a scale or shift of another shape than [N, C]."""
    layer = GroupNorm32(2, 6, backend="triton")
    x = torch.randn(2, 6, 3)
    for what, call in [("weight", lambda: layer(torch.randn(2, 12, 3))),
                       ("scale", lambda: layer(x, torch.randn(2, 3), None)),
                       ("shift", lambda: layer(x, None, torch.randn(1, 6))),
                       ("Expected at least 2", lambda: layer(torch.randn(6))),
                       ("non-empty", lambda: triton_impl.forward(torch.randn(0, 6, 3), None, None, None, None, 2,
                                                                 1e-5, True))]:
        with pytest.raises(ArgumentError, match=what):
            call()


# (shape, groups): an empty batch, zero-size spatial and channel dimensions.
EMPTY = [((0, 2), 1), ((0, 6, 4, 4), 3), ((2, 6, 0), 2), ((2, 0, 4), 1), ((2, 6, 0, 3), 3), ((0, 0), 1)]


def composite(x, weight, bias, scale, shift, groups, act=True):
    """What group_norm_silu stands for: F.group_norm, then the scale, shift and SiLU."""
    per_channel = x.shape[:2] + (1,) * (x.dim() - 2)
    h = F.group_norm(x, groups, weight, bias, 1e-5) * (1 + scale.reshape(per_channel)) + shift.reshape(per_channel)
    return F.silu(h) if act else h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups", EMPTY, ids=str)
def test_empty_inputs_give_what_torch_gives(backend, shape, groups):
    n, c = shape[:2]
    x = torch.randn(shape, requires_grad=True)
    params = [torch.randn(size, requires_grad=True) for size in ((c,), (c,), (n, c), (n, c))]
    check_against_float64(
        lambda x, w, b, s, t: group_norm_silu(x, w, b, groups, scale=s, shift=t, backend=backend),
        lambda x, w, b, s, t: composite(x, w, b, s, t, groups), x, params, 0.0, f"x {shape}")
    y = group_norm_silu(x, params[0], params[1], groups, act=False, backend=backend)
    assert torch.equal(y, F.group_norm(x, groups, params[0], params[1]))


def hostile_inputs(seed, device):
    """Odd sizes, a large mean with a small spread, and nothing contiguous: x a strided view,
    weight and bias every other element, scale a column slice, shift one row expanded."""
    gen = torch.Generator().manual_seed(seed)
    wide = [(1e3 + 0.1 * torch.randn(2, 6, 3, 10, generator=gen)), 1 + torch.randn(12, generator=gen),
            torch.randn(12, generator=gen), 0.3 * torch.randn(2, 12, generator=gen), torch.randn(1, 6, generator=gen)]
    x, w, b, s, t = (v.to(device).requires_grad_() for v in wide)
    return x[..., ::2], w[::2], b[1::2], s[:, 3:9], t.expand(2, 6)  # x: [2, 6, 3, 5]


def test_non_contiguous_parameters_and_odd_sizes_match_float64(device):
    """A weight read as if contiguous would take every element of the wider tensor it views, and
    a weight of stride 0 would be read past its one element."""
    for backend in BACKENDS:
        x, weight, bias, scale, shift = hostile_inputs(3, device)
        assert not any(t.is_contiguous() for t in (x, weight, bias, scale, shift))
        check_against_float64(
            lambda x, w, b, s, t: group_norm_silu(x, w, b, 3, scale=s, shift=t, backend=backend),
            lambda x, w, b, s, t: oracle(x, w, b, 3, 1e-5, s, t, True), x, (weight, bias, scale, shift),
            tolerance(torch.float32, backend), f"{backend}: hostile")
        stride_0 = torch.full((1,), 1.5, device=device).expand(6)
        y = group_norm_silu(x, stride_0, None, 3, act=False, backend=backend)
        assert_close(y, F.group_norm(x.double(), 3, stride_0.double()), 1e-5, f"{backend}: stride-0 weight")


@pytest.mark.parametrize("act", [True, False], ids=["silu", "no_act"])
def test_the_reference_backward_matches_float64_for_every_set_of_parameters(act):
    """The custom op's closed-form reference backward (what torch.compile runs off the Triton
    path), with each of weight, bias, scale and shift present or absent, against the oracle."""
    x = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(4), requires_grad=True)
    full = hostile_inputs(5, "cpu")[1:]
    for kept in itertools.product((True, False), repeat=4):
        params = [t.detach().clone().requires_grad_() if keep else None for t, keep in zip(full, kept)]
        check_against_float64(
            lambda x, *p: group_norm_silu_op(x, *p, 3, 1e-5, act, False)[0],
            lambda x, *p: oracle(x, *p[:2], 3, 1e-5, *p[2:], act), x, params, 1e-5, f"present: {kept}")


@pytest.mark.parametrize("interpret", [False, True], ids=["compiled", "interpreted"])
def test_loading_the_kernels_builds_the_asked_mode_and_leaves_triton_interpret_as_it_was(interpret, monkeypatch):
    """The one process-wide variable the loader sets is back as the caller had it (unset too),
    and the kernels are of the mode asked for, not of the caller's TRITON_INTERPRET."""
    from triton.runtime.interpreter import InterpretedFunction

    name = f"gn_diffusion.kernels.triton_kernels_{'interpreted' if interpret else 'compiled'}"
    monkeypatch.setitem(sys.modules, name, sys.modules.get(name))  # the cached module's stays
    for before in ("0" if interpret else "1", None):
        if before is None:
            monkeypatch.delenv("TRITON_INTERPRET")
        else:
            monkeypatch.setenv("TRITON_INTERPRET", before)
        module = triton_impl._load_kernels.__wrapped__(interpret)  # uncached: executes it again
        assert isinstance(module.fwd_apply_kernel, InterpretedFunction) == interpret
        assert os.environ.get("TRITON_INTERPRET") == before
