"""Triton kernels for group_norm_silu. Imported lazily (see `triton_impl`), because whether
`@triton.jit` builds GPU kernels or interpreted ones is decided when this module is executed.

Addressing: group (n, g) is a [Cg, HW] grid of elements at `base + c * stride_c + p * stride_p`
with p the flattened spatial index, so NCHW (stride_p = 1) and channels_last (stride_c = 1) are
read in place. Work is cut into chunks: a chunk is one block of BLOCK_C channels times a range of
PPS spatial positions. A group that is one chunk is handled by one program from statistics to
output ("fused"); otherwise every chunk writes float32 partials to a workspace and a second kernel
merges them in a fixed order (deterministic, no atomics).

Precision: every value is taken relative to the group's first element x0 (d = x - x0, exact for
nearby float32 values), statistics are merged with Chan's formula, and the stored mean is the mean
of d. That keeps inputs like 1e4 + 0.1 * randn at float32 rounding instead of losing the low bits
of the mean.

Only Triton builtins are used (no `tl.sum`, `tl.sigmoid`, `tl.zeros`, which are themselves
`@triton.jit` functions): those are compiled or interpreted according to TRITON_INTERPRET when
*triton* was imported, and this way the interpreter works whatever the import order.
"""

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr = None):
    return tl.reduce(x, axis, _add)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _chunk(pid, Cg, HW, CB, S, PPS, BLOCK_C: tl.constexpr, FUSED: tl.constexpr):
    """(group, chunk index, split index, channel range, spatial range) of program `pid`."""
    if FUSED:
        group = pid
        chunk = pid * 0
        s = chunk
        c_lo = 0
        c_hi = Cg
        p_lo = 0
        p_hi = HW
    else:
        group = pid // (CB * S)
        chunk = pid % (CB * S)
        s = chunk % S
        c_lo = (chunk // S) * BLOCK_C
        c_hi = tl.minimum(c_lo + BLOCK_C, Cg)
        p_lo = s * PPS
        p_hi = tl.minimum(p_lo + PPS, HW)
    return group, chunk, s, c_lo, c_hi, p_lo, p_hi


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
def _act_grad(a, b, d, dy, SILU: tl.constexpr):
    """dL/dz from dL/dy at z = a * d + b."""
    g = dy
    if SILU:
        z = a[:, None] * d + b[:, None]
        sig = _sigmoid(z)
        g = dy * sig * (1.0 + z * (1.0 - sig))
    return g


@triton.jit
def _grad_sums(x_ptr, dy_ptr, base, x0, a, b, mean, rstd, c0, c_hi, p_lo, p_hi, stride_c, stride_p,
               BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SILU: tl.constexpr):
    """Per channel of one channel block: sum of dz and of dz * xhat over [p_lo, p_hi)."""
    acc_g = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)
    acc_gx = tl.full([BLOCK_C, BLOCK_P], 0.0, tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs, mask = _tile(base, c0, c_hi, p0, p_hi, stride_c, stride_p, BLOCK_C, BLOCK_P)
        d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - x0
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = _act_grad(a, b, d, dy, SILU)  # zero where masked, since dy is
        acc_g += g
        acc_gx += g * ((d - mean) * rstd)
    return _sum(acc_g, axis=1), _sum(acc_gx, axis=1)


@triton.jit
def fwd_stats_kernel(x_ptr, cnt_ptr, mean_ptr, m2_ptr, G, Cg, HW, stride_n, stride_c, stride_p, stride_s, stride_t,
                     CB, S, PPS, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Split path, pass 1: (count, mean, M2) of each chunk into the workspace."""
    pid = tl.program_id(0)
    group, chunk, s, c_lo, c_hi, p_lo, p_hi = _chunk(pid, Cg, HW, CB, S, PPS, BLOCK_C, False)
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
                     HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    """y = act(a * d + b) for one chunk; the statistics come from the workspace, or (FUSED) from
    this program's own pass over its group."""
    pid = tl.program_id(0)
    group, chunk, s, c_lo, c_hi, p_lo, p_hi = _chunk(pid, Cg, HW, CB, S, PPS, BLOCK_C, FUSED)
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
            if SILU:
                z = z * _sigmoid(z)
            tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bwd_reduce_kernel(x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, sg_ptr, sgx_ptr,
                      G, Cg, HW, stride_n, stride_c, stride_p, stride_s, stride_t, CB, S, PPS,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    """Split path, pass 1: per-channel partial sums of dz and dz * xhat into workspace [N * C, S]."""
    pid = tl.program_id(0)
    group, chunk, s, c_lo, c_hi, p_lo, p_hi = _chunk(pid, Cg, HW, CB, S, PPS, BLOCK_C, False)
    base, x0 = _group_origin(x_ptr, group, G, Cg, stride_n, stride_c)
    mean = tl.load(mean_ptr + group)
    rstd = tl.load(rstd_ptr + group)
    a, b, gamma, cs, cmask = _folded_affine(w_ptr, b_ptr, scale_ptr, shift_ptr, group, G, Cg, c_lo,
                                            stride_s, stride_t, mean, rstd,
                                            BLOCK_C, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    sg, sgx = _grad_sums(x_ptr, dy_ptr, base, x0, a, b, mean, rstd, c_lo, c_hi, p_lo, p_hi,
                         stride_c, stride_p, BLOCK_C, BLOCK_P, SILU)
    slot = (group * Cg + cs) * S + s
    tl.store(sg_ptr + slot, sg, mask=cmask)
    tl.store(sgx_ptr + slot, sgx, mask=cmask)


@triton.jit
def bwd_dx_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr,
                  sg_ptr, sgx_ptr, sg_out, sgx_out,
                  G, Cg, HW, stride_n, stride_c, stride_p, stride_s, stride_t, CB, S, PPS,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, FUSED: tl.constexpr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SHIFT: tl.constexpr, SILU: tl.constexpr):
    """dx for one chunk. The group's per-channel sums of dz and dz * xhat come from the workspace,
    or (FUSED) from this program's own first pass; the owner of each channel block writes them to
    [N, C] outputs, from which the parameter gradients follow."""
    pid = tl.program_id(0)
    group, chunk, s, c_lo, c_hi, p_lo, p_hi = _chunk(pid, Cg, HW, CB, S, PPS, BLOCK_C, FUSED)
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
                                 stride_c, stride_p, BLOCK_C, BLOCK_P, SILU)
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
        owner = (cs >= c_lo) & (cs < c_hi) & (cs * 0 + s == 0)
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
            g = _act_grad(a, b, d, dy, SILU)
            dx = a[:, None] * g + e * d + f
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
