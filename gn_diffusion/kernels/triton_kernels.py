"""Triton kernels for group_norm_silu. Imported lazily (see `triton_impl`), because whether
`@triton.jit` builds GPU kernels or interpreted ones is decided when this module is executed.

Names used throughout (the kernels' scalar arguments keep these short names):

- G: groups per sample; Cg: channels per group; HW: spatial positions per channel (H * W, flattened).
- group: one (sample n, group g) pair, numbered n * G + g; it is a [Cg, HW] grid of elements at
  `base + c * stride_c + p * stride_p`, so NCHW (stride_p = 1) and channels_last (stride_c = 1)
  are both read in place. stride_s, stride_t: the row strides of the [N, C] scale and shift.
- tile: BLOCK_C channels x BLOCK_P positions, what a program loads in one step.
- chunk: the part of a group one program handles: one channel block (BLOCK_C channels) times one
  spatial split (a range of PPS positions).
- CB: channel blocks per group, cdiv(Cg, BLOCK_C).
- S: spatial splits per channel block; PPS: positions per split (a multiple of BLOCK_P).
  A group has CB * S chunks, numbered chunk = channel_block * S + split, and program
  pid = group * CB * S + chunk.
- FUSED: a group is a single chunk (CB = S = 1), so one program goes from statistics to output.
  Otherwise every chunk writes float32 partials to a workspace and a second kernel merges them in
  a fixed order (deterministic, no atomics). BLOCK_K and BLOCK_S are powers of two covering the
  CB * S partials of a group and the S partials of a channel block.
- x0, d: the group's first element and d = x - x0; a, b: the per-channel folded affine, so that
  the pre-activation is z = a * d + b; gamma: w * (1 + scale), the affine's slope.
- sg, sgx: per-(n, c) sums of dz and of dz * xhat, from which every parameter gradient follows.

Precision: every value is taken relative to x0 (d is exact for nearby float32 values), statistics
are merged with Chan's formula, and the stored mean is the mean of d. That keeps inputs like
1e4 + 0.1 * randn at float32 rounding instead of losing the low bits of the mean.

Only Triton builtins are used (no `tl.sum`, `tl.sigmoid`, `tl.zeros`, which are themselves
`@triton.jit` functions): those are compiled or interpreted according to TRITON_INTERPRET when
*triton* was imported, and this way the interpreter works whatever the import order.
"""

import os

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


# Triton's interpreter sums with numpy when a reduction's combine function is triton's own
# `_sum_combine`, and otherwise calls the combine function element by element (some 100x slower).
# Compiled kernels keep `_add`: triton's may have been built as an interpreted function, depending
# on TRITON_INTERPRET when triton was imported. (`triton_impl` sets TRITON_INTERPRET while it
# executes this module.)
_SUM_COMBINE = tl.standard._sum_combine if os.environ.get("TRITON_INTERPRET") == "1" else _add


@triton.jit
def _sum(x, axis: tl.constexpr = None):
    return tl.reduce(x, axis, _SUM_COMBINE)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _group_and_chunk(pid, CB, S, FUSED: tl.constexpr):
    """The group program `pid` works on, and its chunk within that group."""
    if FUSED:
        group = pid
        chunk = pid * 0
    else:
        group = pid // (CB * S)
        chunk = pid % (CB * S)
    return group, chunk


@triton.jit
def _chunk_bounds(chunk, Cg, HW, S, PPS, BLOCK_C: tl.constexpr, FUSED: tl.constexpr):
    """The chunk's channels [c_lo, c_hi), counted within its group, and positions [p_lo, p_hi)."""
    if FUSED:
        c_lo = 0
        c_hi = Cg
        p_lo = 0
        p_hi = HW
    else:
        c_lo = (chunk // S) * BLOCK_C
        c_hi = tl.minimum(c_lo + BLOCK_C, Cg)
        p_lo = (chunk % S) * PPS
        p_hi = tl.minimum(p_lo + PPS, HW)
    return c_lo, c_hi, p_lo, p_hi


@triton.jit
def _group_origin(x_ptr, group, G, Cg, stride_n, stride_c):
    """Offset of the group's first element, and that element (the shift for all statistics)."""
    n = group // G
    base = n.to(tl.int64) * stride_n + (group % G).to(tl.int64) * Cg * stride_c
    return base, tl.load(x_ptr + base).to(tl.float32)


@triton.jit
def _tile(base, c0, c_hi, p0, p_hi, stride_c, stride_p, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    cs = c0 + tl.arange(0, BLOCK_C)
    ps = p0 + tl.arange(0, BLOCK_P)
    mask = (cs[:, None] < c_hi) & (ps[None, :] < p_hi)
    return base + cs[:, None] * stride_c + ps[None, :] * stride_p, mask


@triton.jit
def _welford(x_ptr, base, x0, c_lo, c_hi, p_lo, p_hi, stride_c, stride_p,
             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(count, mean, M2) of d = x - x0 over the chunk: exact two-pass per tile, Chan merge across."""
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(c_lo, c_hi, BLOCK_C):
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs, mask = _tile(base, c0, c_hi, p0, p_hi, stride_c, stride_p, BLOCK_C, BLOCK_P)
            d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - x0, 0.0)
            n_t = _sum(mask.to(tl.float32))
            mean_t = _sum(d) / n_t
            dev = tl.where(mask, d - mean_t, 0.0)
            m2_t = _sum(dev * dev)
            total = count + n_t
            delta = mean_t - mean
            mean = mean + delta * (n_t / total)
            m2 = m2 + m2_t + delta * delta * (count * n_t / total)
            count = total
    return count, mean, m2


@triton.jit
def _channel_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, n, C, ch, cmask, stride_s, stride_t,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """gamma = w * (1 + scale), beta = b * (1 + scale) + shift for channels `ch` of sample n."""
    gamma = tl.where(cmask, 1.0, 0.0)
    beta = gamma * 0.0
    if HAS_W:
        gamma = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        beta = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        one_plus = 1.0 + tl.load(scale_ptr + n * stride_s + ch, mask=cmask, other=0.0).to(tl.float32)
        gamma = gamma * one_plus
        beta = beta * one_plus
    if HAS_SHIFT:
        beta = beta + tl.load(shift_ptr + n * stride_t + ch, mask=cmask, other=0.0).to(tl.float32)
    return gamma, beta


@triton.jit
def _folded_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, group, G, Cg, c0, stride_s, stride_t, mean, rstd,
                   BLOCK_C: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per-channel (a, b, gamma) with z = a * d + b: GN affine and AdaGN folded into one FMA."""
    n = group // G
    cs = c0 + tl.arange(0, BLOCK_C)
    cmask = cs < Cg
    ch = (group % G) * Cg + cs
    gamma, beta = _channel_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, n, G * Cg, ch, cmask, stride_s, stride_t,
                                  HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    a = rstd * gamma
    return a, beta - a * mean, gamma, cs, cmask


@triton.jit
def _act_grad(a, b, d, dy, ACT: tl.constexpr):
    """dL/dz from dL/dy at z = a * d + b."""
    g = dy
    if ACT:
        z = a[:, None] * d + b[:, None]
        sig = _sigmoid(z)
        g = dy * sig * (1.0 + z * (1.0 - sig))
    return g


@triton.jit
def _grad_sums(x_ptr, dy_ptr, base, x0, a, b, mean, rstd, c0, c_hi, p_lo, p_hi, stride_c, stride_p,
               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACT: tl.constexpr):
    """Per channel of one channel block: sum of dz and of dz * xhat over [p_lo, p_hi)."""
    acc_g = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)
    acc_gx = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs, mask = _tile(base, c0, c_hi, p0, p_hi, stride_c, stride_p, BLOCK_C, BLOCK_P)
        d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - x0
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _act_grad(a, b, d, dy, ACT)  # zero where masked, since dy is
        acc_g += g
        acc_gx += g * ((d - mean) * rstd)
    return _sum(acc_g, axis=1), _sum(acc_gx, axis=1)


@triton.jit
def fwd_stats_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, G, Cg, HW, stride_n, stride_c, stride_p, stride_s, stride_t,
                     CB, S, PPS, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Split path, pass 1: (count, mean, M2) of each chunk into the workspace."""
    pid = tl.program_id(0)
    group, chunk = _group_and_chunk(pid, CB, S, False)
    c_lo, c_hi, p_lo, p_hi = _chunk_bounds(chunk, Cg, HW, S, PPS, BLOCK_C, False)
    base, x0 = _group_origin(x_ptr, group, G, Cg, stride_n, stride_c)
    count, mean, m2 = _welford(x_ptr, base, x0, c_lo, c_hi, p_lo, p_hi, stride_c, stride_p, BLOCK_C, BLOCK_P)
    tl.store(cnt_ptr + pid, count)
    tl.store(mean_ptr + pid, mean)
    tl.store(m2_ptr + pid, m2)


@triton.jit
def fwd_apply_kernel(x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_out, rstd_out,
                     cnt_ptr, wmean_ptr, m2_ptr, G, Cg, HW, stride_n, stride_c, stride_p, stride_s, stride_t,
                     CB, S, PPS, eps,
                     BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, FUSED: tl.constexpr,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                     HAS_SHIFT: tl.constexpr, ACT: tl.constexpr):
    """y = act(a * d + b) for one chunk; the statistics come from the workspace, or (FUSED) from
    this program's own pass over its group."""
    pid = tl.program_id(0)
    group, chunk = _group_and_chunk(pid, CB, S, FUSED)
    c_lo, c_hi, p_lo, p_hi = _chunk_bounds(chunk, Cg, HW, S, PPS, BLOCK_C, FUSED)
    base, x0 = _group_origin(x_ptr, group, G, Cg, stride_n, stride_c)
    if FUSED:
        count, mean, m2 = _welford(x_ptr, base, x0, 0, Cg, 0, HW, stride_c, stride_p, BLOCK_C, BLOCK_P)
    else:
        k = tl.arange(0, BLOCK_K)
        kmask = k < CB * S
        cnts = tl.load(cnt_ptr + group * CB * S + k, mask=kmask, other=0.0)
        means = tl.load(wmean_ptr + group * CB * S + k, mask=kmask, other=0.0)
        count = _sum(cnts)
        mean = _sum(cnts * means) / count
        dev = means - mean
        m2 = _sum(tl.load(m2_ptr + group * CB * S + k, mask=kmask, other=0.0)) + _sum(cnts * dev * dev)
    rstd = tl.rsqrt(m2 / count + eps)
    first = chunk == 0
    tl.store(mean_out + group, mean, mask=first)
    tl.store(rstd_out + group, rstd, mask=first)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        a, b, gamma, cs, cmask = _folded_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, group, G, Cg, c0,
                                                stride_s, stride_t, mean, rstd,
                                                BLOCK_C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs, mask = _tile(base, c0, c_hi, p0, p_hi, stride_c, stride_p, BLOCK_C, BLOCK_P)
            d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - x0
            z = a[:, None] * d + b[:, None]
            if ACT:
                z = z * _sigmoid(z)
            tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_reduce_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr,
                      G, Cg, HW, stride_n, stride_c, stride_p, stride_s, stride_t, CB, S, PPS,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_SHIFT: tl.constexpr, ACT: tl.constexpr):
    """Split path, pass 1: per-channel partial sums of dz and dz * xhat into workspace [N * C, S]."""
    pid = tl.program_id(0)
    group, chunk = _group_and_chunk(pid, CB, S, False)
    c_lo, c_hi, p_lo, p_hi = _chunk_bounds(chunk, Cg, HW, S, PPS, BLOCK_C, False)
    base, x0 = _group_origin(x_ptr, group, G, Cg, stride_n, stride_c)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    a, b, gamma, cs, cmask = _folded_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, group, G, Cg, c_lo,
                                            stride_s, stride_t, mean, rstd,
                                            BLOCK_C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    sg, sgx = _grad_sums(x_ptr, dy_ptr, base, x0, a, b, mean, rstd, c_lo, c_hi, p_lo, p_hi,
                         stride_c, stride_p, BLOCK_C, BLOCK_P, ACT)
    slot = (group * Cg + cs) * S + chunk % S
    tl.store(sg_ptr + slot, sg, mask=cmask)
    tl.store(sgx_ptr + slot, sgx, mask=cmask)


@triton.jit
def bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                  sg_ptr, sgx_ptr, sg_out, sgx_out,
                  G, Cg, HW, stride_n, stride_c, stride_p, stride_s, stride_t, CB, S, PPS,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, FUSED: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SHIFT: tl.constexpr, ACT: tl.constexpr):
    """dx for one chunk. The group's per-channel sums of dz and dz * xhat come from the workspace,
    or (FUSED) from this program's own first pass; the owner of each channel block writes them to
    [N, C] sums, from which `param_grads_kernel` derives the parameter gradients."""
    pid = tl.program_id(0)
    group, chunk = _group_and_chunk(pid, CB, S, FUSED)
    c_lo, c_hi, p_lo, p_hi = _chunk_bounds(chunk, Cg, HW, S, PPS, BLOCK_C, FUSED)
    split = chunk % S
    base, x0 = _group_origin(x_ptr, group, G, Cg, stride_n, stride_c)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    mean_dxhat = 0.0
    mean_dxhat_xhat = 0.0
    for c0 in range(0, Cg, BLOCK_C):
        a, b, gamma, cs, cmask = _folded_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, group, G, Cg, c0,
                                                stride_s, stride_t, mean, rstd,
                                                BLOCK_C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        if FUSED:
            sg, sgx = _grad_sums(x_ptr, dy_ptr, base, x0, a, b, mean, rstd, c0, Cg, 0, HW,
                                 stride_c, stride_p, BLOCK_C, BLOCK_P, ACT)
        else:
            k = tl.arange(0, BLOCK_S)
            slots = (group * Cg + cs)[:, None] * S + k[None, :]
            smask = cmask[:, None] & (k[None, :] < S)
            sg = _sum(tl.load(sg_ptr + slots, mask=smask, other=0.0), axis=1)
            sgx = _sum(tl.load(sgx_ptr + slots, mask=smask, other=0.0), axis=1)
        mean_dxhat += _sum(gamma * sg)
        mean_dxhat_xhat += _sum(gamma * sgx)
        # channels of this program's chunk, written by its first split (written element-wise:
        # the interpreter rejects a scalar-and-vector mask)
        owner = (cs >= c_lo) & (cs < c_hi) & (cs * 0 + split == 0)
        tl.store(sg_out + group * Cg + cs, sg, mask=owner)
        tl.store(sgx_out + group * Cg + cs, sgx, mask=owner)
    m = Cg * HW * 1.0
    mean_dxhat = mean_dxhat / m
    mean_dxhat_xhat = mean_dxhat_xhat / m
    # dx = rstd * (gamma * dz - mean(dxhat) - xhat * mean(dxhat * xhat)) = a * dz + e * d + f
    e = -rstd * rstd * mean_dxhat_xhat
    f = rstd * rstd * mean_dxhat_xhat * mean - rstd * mean_dxhat
    for c0 in range(c_lo, c_hi, BLOCK_C):
        a, b, gamma, cs, cmask = _folded_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, group, G, Cg, c0,
                                                stride_s, stride_t, mean, rstd,
                                                BLOCK_C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        for p0 in range(p_lo, p_hi, BLOCK_P):
            offs, mask = _tile(base, c0, c_hi, p0, p_hi, stride_c, stride_p, BLOCK_C, BLOCK_P)
            d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - x0
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = _act_grad(a, b, d, dy, ACT)
            dx = a[:, None] * g + e * d + f
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def param_grads_kernel(sg_ptr, sgx_ptr, w_ptr, b_ptr, scale_ptr, dw_ptr, db_ptr, dscale_ptr, dshift_ptr,
                       N, C, stride_s, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Parameter gradients of BLOCK_C channels from the [N, C] sums sg and sgx. With
    z = xhat * w * (1 + s) + b * (1 + s) + t: dshift = sg, dscale = w * sgx + b * sg, and
    dweight, dbias are the sums over n of (1 + s) * sgx and (1 + s) * sg. One program owns its
    channels for the whole batch, in tiles of BLOCK_N samples taken in order: no atomics, the same
    bits every run. dscale may alias sgx and dshift sg: each element is loaded before it is
    overwritten, by the same program."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    b = tl.full([BLOCK_C], 0.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.full([BLOCK_C], 0.0, tl.float32)
    db = tl.full([BLOCK_C], 0.0, tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        mask = (ns[:, None] < N) & cmask[None, :]
        offs = ns[:, None] * C + cs[None, :]
        sg = tl.load(sg_ptr + offs, mask=mask, other=0.0)
        sgx = tl.load(sgx_ptr + offs, mask=mask, other=0.0)
        if HAS_SCALE:
            one_plus = 1.0 + tl.load(scale_ptr + ns[:, None] * stride_s + cs[None, :], mask=mask,
                                     other=0.0).to(tl.float32)
            dscale = w[None, :] * sgx + b[None, :] * sg
            tl.store(dscale_ptr + offs, dscale.to(dscale_ptr.dtype.element_ty), mask=mask)
            sg_w = one_plus * sgx
            sg_b = one_plus * sg
        else:
            sg_w = sgx
            sg_b = sg
        if HAS_SHIFT:
            tl.store(dshift_ptr + offs, sg.to(dshift_ptr.dtype.element_ty), mask=mask)
        dw += _sum(sg_w, axis=0)
        db += _sum(sg_b, axis=0)
    if HAS_W:
        tl.store(dw_ptr + cs, dw.to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_B:
        tl.store(db_ptr + cs, db.to(db_ptr.dtype.element_ty), mask=cmask)
