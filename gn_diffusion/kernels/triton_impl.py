"""Host side of the Triton kernels: layout, the per-shape launch plan, and the launches.

Everything that depends only on the shape (the work split, grids, sizes, compile-time options) is
computed once per shape and cached, so a call costs little more than the launches themselves.

Importing this module imports no Triton and changes nothing outside it. The first call that needs
the kernels in a mode (compiled or interpreted) loads them, and that load is the one place that
changes process-wide state: see `_load_kernels`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Optional

import torch

from .arguments import ArgumentError, check_shape, wrong_shape

# Largest tile (elements) a program processes per step: a group of up to MAX_TILE elements is
# read in one step. The smallest tile bounds how finely the split path cuts a group.
MAX_TILE = 2048
MIN_TILE = {"cuda": 512, "cpu": 32}
# On the CPU (the interpreter) there is no machine to fill; a nominal count still sends small
# batches down the split path, so tests exercise it.
CPU_PROGRAMS = 4
# Channels per program of the parameter-gradient kernel: small, so that wide layers still get
# several programs while each walks the batch.
PARAM_BLOCK_C = 64


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels(device: Optional[torch.device] = None):
    """The kernel module for tensors on `device`: interpreted for CPU tensors (the only way they
    run), else as TRITON_INTERPRET says (the decorator reads it once, so both modules can be
    used in one process). With no device, as TRITON_INTERPRET says."""
    if device is not None and device.type == "cpu":
        return _load_kernels(True)
    return _load_kernels(interpreter_enabled())


@functools.cache
def _load_kernels(interpret: bool) -> ModuleType:
    """triton_kernels.py executed as its own module for one mode, once per process and mode, so
    compiled and interpreted kernels can live side by side (CPU tensors on a CUDA machine).

    What it changes process-wide, each for the reason given where it is done:
    - sys.modules gains `gn_diffusion.kernels.triton_kernels_{interpreted,compiled}`;
    - TRITON_INTERPRET is set to the mode while the module executes, then restored
      (`_triton_interpret_set_to`);
    - for the interpreted mode, with numpy 2.4 or later, Triton's interpreter is patched for good
      (`_patch_the_interpreter_to_index_with_one_element_arrays`).
    """
    if interpret:
        _patch_the_interpreter_to_index_with_one_element_arrays()
    name = f"{__package__}.triton_kernels_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton finds a kernel's globals through its module
    with _triton_interpret_set_to(interpret):
        spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _triton_interpret_set_to(interpret: bool):
    """TRITON_INTERPRET (an environment variable: the whole process sees it, threads included) is
    "1" or "0" inside, and as before after. `@triton.jit` reads it when it decorates a function,
    to build an interpreted or a compiled one, and triton_kernels reads it to pick its sum; so
    the mode a module is executed under is the mode of its kernels, whatever the caller has set."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _patch_the_interpreter_to_index_with_one_element_arrays() -> None:
    """Replaces `triton.runtime.interpreter._patch_lang_tensor`, for the rest of the process and
    every interpreted kernel in it (ours or not), with one that also gives the interpreter's
    tensors Triton 3.9's __index__ (the squeezed element). Why: Triton's interpreter before 3.9
    turns a tensor bound of `range` into an int with int(ndarray of shape (1,)), which numpy 2.4
    refuses, so every kernel with a loop fails there (torch 2.11's Triton 3.6 beside numpy 2.5,
    say); on Triton 3.9 it repeats what Triton does. Does nothing with an older numpy, a Triton
    without that function, or a second time."""
    import numpy as np
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if np.lib.NumpyVersion(np.__version__) < "2.4.0" or patch is None or getattr(patch, "squeezes", False):
        return

    def patch_and_squeeze(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_and_squeeze.squeezes = True
    interpreter._patch_lang_tensor = patch_and_squeeze


def new_output(shape_or_like, dtype=None, device=None) -> torch.Tensor:
    """Every buffer the kernels write; tests replace this to poison outputs."""
    if isinstance(shape_or_like, torch.Tensor):
        return torch.empty_like(shape_or_like)
    return torch.empty(shape_or_like, dtype=dtype, device=device)


def dense_layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x itself if NCHW- or channels_last-contiguous (else a contiguous copy), and whether it is
    read as channels_last (a tensor that is both, e.g. with H = W = 1, is read as NCHW)."""
    if x.is_contiguous():
        return x, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with like's strides (the kernels index dy with x's offsets)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


@dataclass(frozen=True)
class LaunchPlan:
    """How the kernels cut and tile each group of one shape (see triton_kernels for the names)."""

    block_c: int
    block_p: int
    channel_blocks: int
    splits: int  # spatial splits per channel block
    positions_per_split: int
    num_warps: int

    @property
    def chunks(self) -> int:
        return self.channel_blocks * self.splits

    @property
    def fused(self) -> bool:
        return self.chunks == 1


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _programs_to_fill(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_PROGRAMS


@functools.lru_cache(maxsize=1024)
def launch_plan(groups: int, cg: int, hw: int, channels_inner: bool, device: torch.device,
                chunks: Optional[int] = None) -> LaunchPlan:
    """The kernel launch plan: cut each group into chunks so that groups * chunks programs fill the device; one chunk per
    group when the groups alone do. `chunks` forces a target (tests use it to reach the split path)."""
    want = chunks if chunks is not None else _cdiv(_programs_to_fill(device), groups)
    min_tile = 1 if chunks is not None else MIN_TILE.get(device.type, MIN_TILE["cuda"])
    tile = max(min_tile, min(MAX_TILE, _pow2(_cdiv(cg * hw, want))))
    if channels_inner:  # fill the contiguous axis first, so loads are wide
        block_c = min(_pow2(cg), tile)
        block_p = min(_pow2(hw), max(1, tile // block_c))
    else:
        block_p = min(_pow2(hw), tile)
        block_c = min(_pow2(cg), max(1, tile // block_p))
    channel_blocks = _cdiv(cg, block_c)
    position_blocks = _cdiv(hw, block_p)
    splits = max(1, min(position_blocks, _cdiv(want, channel_blocks)))
    per_split = _cdiv(position_blocks, splits)
    splits = _cdiv(position_blocks, per_split)  # no empty split
    num_warps = min(8, max(1, block_c * block_p // 256))
    return LaunchPlan(block_c, block_p, channel_blocks, splits, per_split * block_p, num_warps)


@dataclass(frozen=True)
class Launch:
    """What the launches for one input shape and layout share (see triton_kernels for the names)."""

    plan: LaunchPlan
    grid: tuple[int]  # one program per chunk
    sizes: tuple[int, ...]  # G, Cg, HW, stride_n, stride_c, stride_p
    chunking: tuple[int, int, int]  # CB, S, PPS
    tile: dict  # BLOCK_C, BLOCK_P, num_warps
    param_grid: tuple[int]
    param_tile: dict  # BLOCK_N, BLOCK_C of param_grads_kernel
    channels: torch.Size  # [C]: the shape of weight and bias
    rows: torch.Size  # [N, C]: the shape of scale and shift
    options: dict = field(default_factory=dict, compare=False)  # see kernel_options


def kernel_options(launch: Launch, kernel: str, act: bool, present: tuple[bool, ...]) -> dict:
    """The keyword arguments of one kernel's launch (tiles, compile-time flags), built once per
    launch, activation and set of present tensors, then reused by every call."""
    per_kernel = launch.options.get((act, present))
    if per_kernel is None:
        planned = launch.plan
        flags = dict(zip(("HAS_W", "HAS_B", "HAS_SCALE", "HAS_SHIFT"), present))
        per_kernel = launch.options[act, present] = {
            "fwd_apply": dict(BLOCK_K=_pow2(planned.chunks), FUSED=planned.fused, ACT=act, **launch.tile,
                              **flags),
            "bwd_reduce": dict(ACT=act, **launch.tile, **flags),
            "bwd_dx": dict(BLOCK_S=_pow2(planned.splits), FUSED=planned.fused, ACT=act, **launch.tile, **flags),
            "param_grads": dict(**launch.param_tile, **flags),
        }
    return per_kernel[kernel]


@functools.lru_cache(maxsize=1024)
def launch_for(shape: tuple[int, ...], channels_last: bool, num_groups: int, device: torch.device,
               chunks: Optional[int] = None) -> Launch:
    """The launches for x of `shape`; refuses (once per shape) what the kernels cannot index."""
    check_shape(shape, num_groups)
    if not math.prod(shape):
        raise ArgumentError(f"the Triton kernels need a non-empty x, got shape {tuple(shape)} "
                            "(group_norm_silu computes an empty x with PyTorch)")
    n, c = shape[:2]
    cg, hw = c // num_groups, math.prod(shape[2:])
    strides = (hw * c, 1, c) if channels_last else (c * hw, hw, 1)
    planned = launch_plan(n * num_groups, cg, hw, channels_last, device, chunks)
    param_c = min(PARAM_BLOCK_C, _pow2(c))
    return Launch(
        plan=planned, grid=(n * num_groups * planned.chunks,), sizes=(num_groups, cg, hw, *strides),
        chunking=(planned.channel_blocks, planned.splits, planned.positions_per_split),
        tile=dict(BLOCK_C=planned.block_c, BLOCK_P=planned.block_p, num_warps=planned.num_warps),
        param_grid=(_cdiv(c, param_c),),
        param_tile=dict(BLOCK_N=min(_pow2(n), max(1, MAX_TILE // param_c)), BLOCK_C=param_c),
        channels=shape[1:2], rows=shape[:2],
    )


class KernelSizes(NamedTuple):
    """The scalar arguments every kernel takes after its pointers, in the kernels' order and with
    their names (see triton_kernels); passed as `*sizes`."""

    G: int
    Cg: int
    HW: int
    stride_n: int  # x's strides: per sample, channel and position
    stride_c: int
    stride_p: int
    stride_s: int  # the row stride of the [N, C] scale (0 when there is none)
    stride_t: int  # and of shift
    CB: int
    S: int
    PPS: int


class Prepared(NamedTuple):
    """Everything a forward and its backward share, worked out once per call by `prepare`.
    NamedTuples (not dataclasses) since one is built per call: they cost about as much to make
    as the plain tuples they name."""

    kernels: ModuleType  # triton_kernels, compiled or interpreted as x's device needs (see `kernels`)
    x: torch.Tensor  # in a layout the kernels read (see `dense_layout`)
    launch: Launch  # cached per shape and layout: the launch plan, grids, tiles
    params: tuple[Optional[torch.Tensor], ...]  # weight, bias, scale, shift as the kernels index them
    present: tuple[bool, bool, bool, bool]  # which of params are not None: the kernels' HAS_* flags
    sizes: KernelSizes


def prepare(x, weight, bias, scale, shift, num_groups: int, chunks: Optional[int] = None) -> Prepared:
    """The host work of one call (see `Prepared`). Whoever calls, a tensor the kernels would index
    out of its bounds is refused, here, on every call (a few shape comparisons)."""
    x, channels_last = dense_layout(x)
    launch = launch_for(x.shape, channels_last, num_groups, x.device, chunks)
    c, rows = launch.channels, launch.rows
    if not (_fits(weight, c) and _fits(bias, c) and _fits(scale, rows) and _fits(shift, rows)):
        weight, bias, scale, shift = _readable(x.shape, launch, weight, bias, scale, shift)
    present = (weight is not None, bias is not None, scale is not None, shift is not None)
    sizes = KernelSizes(*launch.sizes, 0 if scale is None else scale.stride(0),
                        0 if shift is None else shift.stride(0), *launch.chunking)
    return Prepared(kernels(x.device), x, launch, (weight, bias, scale, shift), present, sizes)


def _fits(t: Optional[torch.Tensor], shape: torch.Size) -> bool:
    """Whether the kernels can index t as it is: exactly `shape` ([C] or [N, C]) and its last stride
    1 (any row stride of an [N, C] tensor will do)."""
    return t is None or (t.shape == shape and t.stride()[-1] == 1)


def _readable(x_shape, launch: Launch, *params) -> list[Optional[torch.Tensor]]:
    """weight, bias, scale, shift as the kernels index them: a copy of one whose last stride is
    not 1 (a weight of stride 0 would be read past its one element); one of another shape refused."""
    readable = []
    for name, t, shape in zip(("weight", "bias", "scale", "shift"), params, (launch.channels,) * 2 + (launch.rows,) * 2):
        if t is not None and t.shape != shape:
            raise wrong_shape(name, t.shape, x_shape)
        readable.append(t if _fits(t, shape) else t.contiguous())
    return readable


def _pointers(x, params) -> list[torch.Tensor]:
    """Kernel pointers for weight, bias, scale, shift: x stands in for an absent one (never read)."""
    return [t if t is not None else x for t in params]


def forward(x, weight, bias, scale, shift, num_groups: int, eps: float, act: bool,
            chunks: Optional[int] = None):
    """(y, mean, rstd): mean is float32 [N, G] of x minus each group's first element."""
    return forward_prepared(prepare(x, weight, bias, scale, shift, num_groups, chunks), eps, act)


def forward_prepared(prepared: Prepared, eps: float, act: bool):
    k, x, launch, sizes = prepared.kernels, prepared.x, prepared.launch, prepared.sizes
    ptrs = _pointers(x, prepared.params)
    y = new_output(x)
    mean = new_output((x.shape[0], sizes.G), torch.float32, x.device)
    rstd = new_output((x.shape[0], sizes.G), torch.float32, x.device)
    if launch.plan.fused:
        ws = (mean, mean, mean)  # not read
    else:
        ws = [torch.empty(launch.grid, dtype=torch.float32, device=x.device) for _ in range(3)]
        k.fwd_stats_kernel[launch.grid](x, *ws, *sizes, **launch.tile)
    k.fwd_apply_kernel[launch.grid](x, y, *ptrs, mean, rstd, *ws, *sizes, eps,
                                    **kernel_options(launch, "fwd_apply", act, prepared.present))
    return y, mean, rstd


def backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups: int, act: bool,
             chunks: Optional[int] = None):
    """(dx, dweight, dbias, dscale, dshift), all reduced by the kernels; the gradient of an absent
    tensor is None."""
    return backward_prepared(prepare(x, weight, bias, scale, shift, num_groups, chunks), dy, mean, rstd, act)


def backward_prepared(prepared: Prepared, dy, mean, rstd, act: bool):
    k, x, launch, sizes, present = prepared.kernels, prepared.x, prepared.launch, prepared.sizes, prepared.present
    ptrs = _pointers(x, prepared.params)
    dy = match_layout(dy, x)
    dx = new_output(x)
    sg = new_output(x.shape[:2], torch.float32, x.device)  # per (n, c) sums of dz and dz * xhat
    sgx = new_output(x.shape[:2], torch.float32, x.device)
    if launch.plan.fused:
        ws = (sg, sgx)  # not read
    else:
        ws = [torch.empty(sg.numel() * launch.plan.splits, dtype=torch.float32, device=x.device) for _ in range(2)]
        k.bwd_reduce_kernel[launch.grid](x, dy, *ptrs, mean, rstd, *ws, *sizes,
                                         **kernel_options(launch, "bwd_reduce", act, present))
    k.bwd_dx_kernel[launch.grid](x, dy, dx, *ptrs, mean, rstd, *ws, sg, sgx, *sizes,
                                 **kernel_options(launch, "bwd_dx", act, present))
    if not any(present):
        return dx, None, None, None, None
    return (dx, *_parameter_grads(k, launch, sg, sgx, prepared.params, ptrs, sizes.stride_s, present))


def _row_grad(t: Optional[torch.Tensor], sums: torch.Tensor) -> Optional[torch.Tensor]:
    """The buffer for the gradient of an [N, C] scale or shift: the float32 sums themselves when
    t is float32, else a new tensor of t's dtype; None for an absent t."""
    if t is None:
        return None
    return sums if t.dtype == torch.float32 else new_output(sums.shape, t.dtype, t.device)


def _parameter_grads(k, launch: Launch, sg, sgx, params, ptrs, stride_s: int, present):
    """dweight, dbias, dscale, dshift (None where the tensor is absent) from the [N, C] float32
    sums sg, sgx. A float32 dshift is written over sg and a float32 dscale over sgx (each element
    is read, then written, by the same program): two allocations fewer per call."""
    weight, bias, scale, shift = params
    grads = [None if weight is None else new_output(weight), None if bias is None else new_output(bias),
             _row_grad(scale, sgx), _row_grad(shift, sg)]
    outs = [g if g is not None else sg for g in grads]  # placeholders are never written
    k.param_grads_kernel[launch.param_grid](sg, sgx, *ptrs[:3], *outs, sg.shape[0], sg.shape[1], stride_s,
                                            **kernel_options(launch, "param_grads", False, present))
    return grads
