"""Host side of the Triton kernels: layout, work plan, launches, and the parameter gradients."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .reference import parameter_grads

# Largest tile (elements) a program processes per step: a group of up to MAX_TILE elements is
# read in one step. The smallest tile bounds how finely the split path cuts a group.
MAX_TILE = 2048
MIN_TILE = {"cuda": 512, "cpu": 32}
# On the CPU (the interpreter) there is no machine to fill; a nominal count still sends small
# batches down the split path, so tests exercise it.
CPU_PROGRAMS = 8


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels():
    """The kernel module, executed under the current TRITON_INTERPRET setting (the decorator reads
    it once), so interpreted and compiled kernels can both be used in one process."""
    return _load_kernels(interpreter_enabled())


@functools.cache
def _load_kernels(interpret: bool):
    name = f"{__package__}.triton_kernels_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # triton finds a kernel's globals through its module
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(module)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return module


def new_output(shape_or_like, dtype=None, device=None) -> torch.Tensor:
    """Every buffer the kernels write; tests replace this to poison outputs."""
    if isinstance(shape_or_like, torch.Tensor):
        return torch.empty_like(shape_or_like)
    return torch.empty(shape_or_like, dtype=dtype, device=device)


def dense_layout(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x itself if NCHW- or channels_last-contiguous (else a contiguous copy), with the strides of
    (sample, channel, flattened spatial position)."""
    n, c = x.shape[:2]
    hw = x[0, 0].numel()
    if x.dim() == 4 and hw > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return x, (hw * c, 1, c)
    return x.contiguous(), (c * hw, hw, 1)


def match_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t with like's strides (the kernels index dy with x's offsets)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


@dataclass(frozen=True)
class Plan:
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


def plan(groups: int, cg: int, hw: int, channels_inner: bool, device: torch.device,
         chunks: Optional[int] = None) -> Plan:
    """Cut each group into chunks so that groups * chunks programs fill the device; one chunk per
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
    return Plan(block_c, block_p, channel_blocks, splits, per_split * block_p, num_warps)


def _affine_args(x, weight, bias, scale, shift):
    """Kernel pointers (x stands in for absent tensors, never read), row strides, HAS_* flags."""
    scale, shift = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (scale, shift))
    ptrs = [t if t is not None else x for t in (weight, bias, scale, shift)]
    strides = [t.stride(0) if t is not None else 0 for t in (scale, shift)]
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None)
    return ptrs, strides, flags


def _setup(x, weight, bias, scale, shift, num_groups: int, chunks: Optional[int]):
    """x in a layout the kernels read, the plan, and the arguments every kernel shares: the
    affine pointers, the sizes (G, Cg, HW, four strides, CB, S, PPS) and the compile-time options."""
    x, (sn, sc, sp) = dense_layout(x)
    n, c = x.shape[:2]
    cg, hw = c // num_groups, x[0, 0].numel()
    p = plan(n * num_groups, cg, hw, sc == 1, x.device, chunks)
    ptrs, (ss, st), flags = _affine_args(x, weight, bias, scale, shift)
    sizes = (num_groups, cg, hw, sn, sc, sp, ss, st, p.channel_blocks, p.splits, p.positions_per_split)
    options = dict(BLOCK_C=p.block_c, BLOCK_P=p.block_p, num_warps=p.num_warps)
    return x, p, ptrs, sizes, flags, options


def forward(x, weight, bias, scale, shift, num_groups: int, eps: float, silu: bool,
            chunks: Optional[int] = None):
    """(y, mean, rstd): mean is float32 [N, G] of x minus each group's first element."""
    k = kernels()
    x, p, ptrs, sizes, flags, options = _setup(x, weight, bias, scale, shift, num_groups, chunks)
    y = new_output(x)
    mean = new_output((x.shape[0], num_groups), torch.float32, x.device)
    rstd = new_output((x.shape[0], num_groups), torch.float32, x.device)
    grid = (mean.numel() * p.chunks,)
    ws = [mean] * 3 if p.fused else [torch.empty(grid, dtype=torch.float32, device=x.device) for _ in range(3)]
    if not p.fused:
        k.fwd_stats_kernel[grid](x, *ws, *sizes, **options)
    k.fwd_apply_kernel[grid](x, y, *ptrs, mean, rstd, *ws, *sizes, eps, BLOCK_K=_pow2(p.chunks), FUSED=p.fused,
                             SILU=silu, **options, **flags)
    return y, mean, rstd


def backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups: int, silu: bool,
             chunks: Optional[int] = None):
    """(dx, dweight, dbias, dscale, dshift); the gradient of an absent tensor is None."""
    k = kernels()
    x, p, ptrs, sizes, flags, options = _setup(x, weight, bias, scale, shift, num_groups, chunks)
    dy = match_layout(dy, x)
    dx = new_output(x)
    sum_dz = new_output(x.shape[:2], torch.float32, x.device)
    sum_dz_xhat = new_output(x.shape[:2], torch.float32, x.device)
    ws = [sum_dz] * 2 if p.fused else [torch.empty(sum_dz.numel() * p.splits, dtype=torch.float32, device=x.device)
                                       for _ in range(2)]
    grid = (mean.numel() * p.chunks,)
    if not p.fused:
        k.bwd_reduce_kernel[grid](x, dy, *ptrs, mean, rstd, *ws, *sizes, SILU=silu, **options, **flags)
    k.bwd_dx_kernel[grid](x, dy, dx, *ptrs, mean, rstd, *ws, sum_dz, sum_dz_xhat, *sizes,
                          BLOCK_S=_pow2(p.splits), FUSED=p.fused, SILU=silu, **options, **flags)
    return (dx, *parameter_grads(sum_dz, sum_dz_xhat, weight, bias, scale, shift))
