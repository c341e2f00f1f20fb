"""DDPM-style U-Net of Conv-Norm-SiLU residual blocks with AdaGN timestep/class conditioning."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import diffusers
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from einops import rearrange
from torch import nn

from ..errors import ConfigError
from .norms import check_norm_name, make_norm, norm_uses_groups


# ---------------------------------------------------------------------------------------------
# The channel plan: one description of the blocks, read by the builder and by config validation


@dataclass(frozen=True)
class BlockSpec:
    level: int  # resolution level: image_size // 2**level
    in_ch: int
    out_ch: int
    resample: bool = False  # down path: a stride-2 conv; up path: block ends with an upsample


def channel_plan(base_channels: int, channel_mult: Sequence[int], num_res_blocks: int):
    """(down, middle, up) lists of BlockSpec in build order.

    A down spec with `resample` is a downsample; every down entry (and the stem) leaves one skip
    tensor, and every up block concatenates one of them in reverse order.
    """
    last = len(channel_mult) - 1
    ch = base_channels
    skips = [ch]
    down: list[BlockSpec] = []
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            down.append(BlockSpec(level, ch, base_channels * mult))
            ch = base_channels * mult
            skips.append(ch)
        if level != last:
            down.append(BlockSpec(level, ch, ch, resample=True))
            skips.append(ch)
    middle = [BlockSpec(last, ch, ch), BlockSpec(last, ch, ch)]
    up: list[BlockSpec] = []
    for level in reversed(range(len(channel_mult))):
        out = base_channels * channel_mult[level]
        for i in range(num_res_blocks + 1):
            upsample = level != 0 and i == num_res_blocks
            up.append(BlockSpec(level, ch + skips.pop(), out, resample=upsample))
            ch = out
    return down, middle, up


def norm_widths(base_channels: int, channel_mult: Sequence[int], num_res_blocks: int) -> list[int]:
    """Every channel count a norm layer sees, skip concatenations included."""
    down, middle, up = channel_plan(base_channels, channel_mult, num_res_blocks)
    blocks = [s for s in down if not s.resample] + middle + up  # downsamples have no norm
    return [w for s in blocks for w in (s.in_ch, s.out_ch)]


# ---------------------------------------------------------------------------------------------
# Layers


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps [N]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so the block it ends starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)


class TokenConv1x1(nn.Conv2d):
    """A 1x1 convolution applied to [B, L, C] tokens as a matmul. Its weight stays Conv2d's
    [out, in, 1, 1], so model files are unchanged; it runs as a module call, so diffusers'
    per-layer hooks (layerwise casting, group offloading) cast or move its weight first."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(in_ch, out_ch, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)


@dataclass(frozen=True)
class NormSpec:
    """Every norm layer of one U-Net: its kind, grouping (a group count, or channels per group),
    epsilon and kernel backend."""

    kind: str
    groups: Optional[int]
    eps: float
    backend: str
    channels_per_group: Optional[int] = None

    def groups_for(self, channels: int) -> int:
        """The group count of a layer `channels` wide."""
        if self.channels_per_group is not None:
            return channels // self.channels_per_group
        if self.groups is None:
            raise ValueError("a NormSpec needs groups or channels_per_group")
        return self.groups

    def make(self, channels: int) -> nn.Module:
        return make_norm(self.kind, channels, groups=self.groups_for(channels), eps=self.eps, backend=self.backend)


class ResBlock(nn.Module):
    """norm -> SiLU -> conv -> AdaGN(norm, emb) -> SiLU -> dropout -> conv (zero-init), + skip."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout, norm: NormSpec, scale_shift: bool):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = norm.make(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.emb_proj = nn.Linear(emb_dim, out_ch * (2 if scale_shift else 1))
        self.norm2 = norm.make(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(conv3x3(out_ch, out_ch))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, act=True))
        e = self.emb_proj(F.silu(emb))
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h, scale, shift, act=True)
        else:
            h = self.norm2(h + e[:, :, None, None].to(h.dtype), act=True)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual, zero-init output."""

    def __init__(self, channels: int, heads: int, norm: NormSpec):
        super().__init__()
        self.heads = heads
        self.norm = norm.make(channels)
        self.qkv = TokenConv1x1(channels, 3 * channels)
        self.proj = zero_init(TokenConv1x1(channels, channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # The 1x1 convolutions run as matmuls over the pixels, so q, k and v come out with the
        # head dimension contiguous: SDPA's fused (flash) kernels need that, and without it fall
        # back to the math path, which materializes the attention matrix (on the CPU as on CUDA).
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        qkv = self.qkv(tokens)
        q, k, v = rearrange(qkv, "b l (three heads d) -> three b heads l d", three=3, heads=self.heads)
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "b heads l d -> b l (heads d)")
        return x + rearrange(self.proj(out), "b (h w) c -> b c h w", h=x.shape[2])


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Sequential):
    """A run of layers that all take (x, emb)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class UNetOutput(BaseOutput):
    sample: torch.Tensor


class GNUNet(ModelMixin, ConfigMixin):
    """The U-Net. Subclasses diffusers' ModelMixin/ConfigMixin, so save_pretrained/from_pretrained
    round-trip in safetensors and DDPMPipeline/DDIMPipeline run it unchanged.

    Built here, each block's last layer starts at zero (every block the identity) and the output
    conv as PyTorch initializes it, as in a diffusers model; build_unet, the project's recipe,
    also zeroes the output conv, as DDPM does, so a new run starts by predicting zero."""

    _supports_gradient_checkpointing = True
    ignore_for_config = ["backend"]  # how the norms run here, not part of the model

    @register_to_config
    def __init__(
        self,
        *,
        sample_size: int,
        in_channels: int,
        out_channels: Optional[int],
        base_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        attention_heads: int,
        dropout: float,
        norm: str,
        groups: Optional[int],
        norm_eps: float,
        scale_shift: bool,
        num_classes: int,
        channels_per_group: Optional[int] = None,
        backend: str = "auto",
    ):
        # No defaults here: ModelConfig holds them, and build_unet passes every field. (The
        # exception, channels_per_group, came later: older exported config.json files lack it.)
        super().__init__()
        self.gradient_checkpointing = False
        norm_spec = NormSpec(norm, groups, norm_eps, backend, channels_per_group)
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # One extra "null" class: the label classifier-free guidance drops to.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = conv3x3(in_channels, base_channels)

        def stage(spec: BlockSpec, upsample: bool = False) -> Stage:
            layers: list[nn.Module] = [
                ResBlock(spec.in_ch, spec.out_ch, emb_dim, dropout, norm_spec, scale_shift)
            ]
            if sample_size // 2**spec.level in attention_resolutions:
                layers.append(AttentionBlock(spec.out_ch, attention_heads, norm_spec))
            if upsample:
                layers.append(Upsample(spec.out_ch))
            return Stage(*layers)

        down, middle, up = channel_plan(base_channels, channel_mult, num_res_blocks)
        self.down = nn.ModuleList(
            Stage(Downsample(s.out_ch)) if s.resample else stage(s) for s in down
        )
        first, second = middle
        self.middle = Stage(
            ResBlock(first.in_ch, first.out_ch, emb_dim, dropout, norm_spec, scale_shift),
            AttentionBlock(first.out_ch, attention_heads, norm_spec),
            ResBlock(second.in_ch, second.out_ch, emb_dim, dropout, norm_spec, scale_shift),
        )
        self.up = nn.ModuleList(stage(s, upsample=s.resample) for s in up)
        self.norm_out = norm_spec.make(up[-1].out_ch)
        self.conv_out = conv3x3(up[-1].out_ch, out_channels or in_channels)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        emb = self._embed(sample, timestep, class_labels)
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        out = self.conv_out(self.norm_out(h, act=True))
        return UNetOutput(sample=out) if return_dict else (out,)

    def _embed(self, sample, timestep, class_labels) -> torch.Tensor:
        n = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(n) if t.numel() == 1 else t.reshape(n)
        # The input's dtype is the one the layers compute in (conv_in needs it to match), and,
        # unlike a weight's, it stays that dtype under layerwise casting's fp8 storage.
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels).to(sample.dtype))
        if self.class_embed is not None:
            if class_labels is None:  # unconditional: the null class
                class_labels = torch.full((n,), self.config.num_classes, device=sample.device)
            emb = emb + self.class_embed(class_labels.reshape(n).long())
        elif class_labels is not None:
            raise ValueError("class_labels were given to an unconditional model (num_classes=0).")
        return emb

    def _run(self, block: Stage, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, h, emb)
        return block(h, emb)


# AutoModel.from_pretrained looks a model folder's config.json _class_name up on the diffusers module.
setattr(diffusers, GNUNet.__name__, GNUNet)


def unet_arguments(model_cfg) -> dict:
    """GNUNet's constructor arguments from a ModelConfig: every field but the training-only ones."""
    args = dataclasses.asdict(model_cfg)
    args.pop("gradient_checkpointing")
    args["sample_size"] = args.pop("image_size")
    return args


def build_unet(model_cfg, runtime=None) -> GNUNet:
    """Build the U-Net of a ModelConfig (checked first) whose norms run on `runtime.backend`
    (a RuntimeConfig; default: auto), its output conv at zero (DDPM's start). This is where the
    backend setting is read."""
    check_model_config(model_cfg)
    backend = runtime.backend if runtime is not None else "auto"
    model = GNUNet(**unet_arguments(model_cfg), backend=backend)
    zero_init(model.conv_out)
    if model_cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


# ---------------------------------------------------------------------------------------------
# Model-shape checks: run by build_unet, and by training before any folder is touched


def check_model_config(m) -> None:
    """A ConfigError naming the fix unless a U-Net of this ModelConfig can be built."""
    check_norm_name(m.norm)
    levels = len(m.channel_mult)
    halvings = (m.image_size & -m.image_size).bit_length() - 1  # how often image_size halves evenly
    if levels - 1 > halvings:
        raise ConfigError(f"'model.image_size' {m.image_size} halves evenly {halvings} times, too few for "
                          f"{levels} levels; give at most {halvings + 1} channel_mult entries, or an image_size "
                          f"that halves evenly {levels - 1} times.")
    resolutions = {m.image_size // 2**i for i in range(levels)}
    missing = sorted(set(m.attention_resolutions) - resolutions)
    if missing:
        raise ConfigError(
            f"'model.attention_resolutions' {missing} is not a resolution of this U-Net; choose from {sorted(resolutions)}."
        )
    _check_attention_heads(m)
    _check_groups(m)


def _check_attention_heads(m) -> None:
    widths = {m.base_channels * mult for i, mult in enumerate(m.channel_mult)
              if m.image_size // 2**i in m.attention_resolutions}
    widths = sorted(widths | {m.base_channels * m.channel_mult[-1]})  # the middle block always attends
    bad = [w for w in widths if w % m.attention_heads]
    if bad:
        raise ConfigError(
            f"'model.attention_heads' {m.attention_heads} does not divide attention width(s) {bad}; "
            f"use a divisor such as {math.gcd(*bad)}."
        )


def _check_groups(m) -> None:
    """The grouping must divide every width a norm sees, including the skip concatenations."""
    if not norm_uses_groups(m.norm):  # batch, layer, instance, ... ignore model.groups
        return
    widths = norm_widths(m.base_channels, m.channel_mult, m.num_res_blocks)
    key, size = ("channels_per_group", m.channels_per_group) if m.channels_per_group else ("groups", m.groups)
    bad = sorted(w for w in set(widths) if w % size)
    if bad:
        fit = math.gcd(*widths)
        fit = max(d for d in range(1, min(fit, size) + 1) if fit % d == 0)
        raise ConfigError(
            f"'model.{key}' {size} does not divide the channel width(s) {bad} that a norm sees; "
            f"set model.{key}={fit} or change model.base_channels/channel_mult."
        )
