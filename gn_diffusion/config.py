"""Typed configuration: dataclasses, YAML loading, dotted overrides and validation.

Every check on a user's settings lives in this module, so a bad config fails before any model,
dataset or output folder is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError
from .files import write_text_atomic


@dataclass
class ModelConfig:
    image_size: int = 16
    in_channels: int = 1
    out_channels: Optional[int] = None  # None: same as in_channels
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [8])
    attention_heads: int = 1
    dropout: float = 0.0
    norm: str = "group"
    groups: int = 32
    norm_eps: float = 1e-5
    scale_shift: bool = True  # AdaGN; false gives DDPM's additive timestep conditioning
    num_classes: int = 0  # 0: unconditional
    gradient_checkpointing: bool = False
    kernels: str = "auto"  # auto | triton | torch: which group_norm_silu implementation runs


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | image_folder
    path: Optional[str] = None  # image_folder only
    random_flip: bool = False
    class_labels: bool = False  # image_folder: one class per sub-folder
    num_workers: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/digits"
    seed: int = 0
    batch_size: int = 32  # per device
    gradient_accumulation_steps: int = 1
    max_steps: int = 4000
    lr: float = 2e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay ramps up as (1 + step) / (10 + step) early in training
    mixed_precision: str = "no"  # no | fp16 | bf16
    label_dropout: float = 0.1  # class-conditional models: fraction of labels replaced by null
    log_every: int = 50
    sample_every: int = 1000
    sample_images: int = 16  # images in the grids written every sample_every steps
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # None | "auto" | a checkpoint folder
    overwrite: bool = False
    cpu: bool = False  # force the CPU even where a GPU is present
    cpu_threads: int = 0  # CPU runs: torch's intra-op threads; 0 keeps torch's default (one per core)


@dataclass
class SampleConfig:
    scheduler: str = "ddim"  # ddpm | ddim | dpm-solver++
    num_inference_steps: int = 50
    num_images: int = 64
    batch_size: int = 64
    seed: int = 0
    class_labels: Optional[list[int]] = None  # cycled over the images; None: unconditional
    guidance_scale: float = 1.0
    output_dir: Optional[str] = None  # None: <run dir>/generated
    use_ema: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.kernels": ("auto", "triton", "torch"),
    "diffusion.beta_schedule": ("linear", "cosine"),
    "diffusion.prediction_type": ("epsilon", "v_prediction", "sample"),
    "data.dataset": ("digits", "image_folder"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "sample.scheduler": ("ddpm", "ddim", "dpm-solver++"),
}

POSITIVE = [
    "model.image_size", "model.in_channels", "model.out_channels", "model.base_channels",
    "model.num_res_blocks", "model.attention_heads", "model.groups", "model.norm_eps",
    "diffusion.num_train_timesteps", "diffusion.beta_start", "diffusion.beta_end",
    "train.batch_size", "train.gradient_accumulation_steps", "train.max_steps", "train.lr",
    "train.log_every", "train.sample_every", "train.sample_images", "train.checkpoint_every", "train.keep_checkpoints",
    "sample.num_inference_steps", "sample.num_images", "sample.batch_size",
]
NON_NEGATIVE = [
    "model.num_classes", "train.warmup_steps", "train.weight_decay", "train.grad_clip",
    "data.num_workers", "sample.guidance_scale", "train.cpu_threads",
]
UNIT_INTERVAL = [  # [0, 1)
    "model.dropout", "train.ema_decay", "train.label_dropout", "train.adam_beta1",
    "train.adam_beta2",
]


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `key=value` overrides,
    and validate the result."""
    raw = read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as written by `Config.to_dict`)."""
    cfg = build_typed(Config, raw, prefix="")
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A validated copy of `cfg` with `section.key=value` overrides applied."""
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set each `dotted.key=value` override in the nested dict `raw` (in place); returns `raw`."""
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    return raw


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a YAML file such as configs/digits.yaml.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}; fix its syntax.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of section names to settings (e.g. model: ..., train: ...).")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form section.key=value, e.g. train.lr=1e-4.")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # a plain string that YAML cannot read, such as 'a: b'
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}' goes inside '{part}', which is not a section.")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Typed construction


def build_typed(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of dataclass `cls` from a nested dict: unknown keys and wrong types are ConfigErrors."""
    name = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{name}' must be a mapping of keys to values, not {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"unknown key '{prefix}{key}'; {_suggest(str(key), list(fields), prefix)}")
    values = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = build_typed(kind, value if value is not None else {}, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**values)


def _suggest(key: str, options: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{prefix}{close[0]}'?"
    return f"valid keys are {', '.join(prefix + o for o in options)}."


def _coerce(value: Any, kind: Any, name: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # 'attention_resolutions=16' means [16]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {value!r}.")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"'{name}' must be {_describe(kind)}, got {value!r}.")


def _describe(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


# ---------------------------------------------------------------------------------------------
# Validation: the one place that judges values


def validate(cfg: Config) -> None:
    for key, options in CHOICES.items():
        value = _get(cfg, key)
        if value not in options:
            raise ConfigError(f"'{key}' is {value!r}; choose one of {', '.join(options)}.")
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and not value > 0:
            raise ConfigError(f"'{key}' must be positive, got {value}.")
    for key in NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"'{key}' must not be negative, got {_get(cfg, key)}.")
    for key in UNIT_INTERVAL:
        value = _get(cfg, key)
        if not 0 <= value < 1:
            raise ConfigError(f"'{key}' must be in [0, 1), got {value}.")
    _validate_model(cfg.model)
    _validate_data(cfg)
    _validate_diffusion(cfg.diffusion)
    _validate_sample(cfg)
    _validate_train(cfg.train)
    _validate_conditioning(cfg)
    _validate_kernels(cfg)


def _validate_kernels(cfg: Config) -> None:
    """kernels=triton needs CUDA (or TRITON_INTERPRET=1), also where train.cpu forces the CPU."""
    if cfg.model.kernels == "triton":
        import torch

        from .kernels import require_triton

        require_triton(torch.device("cpu") if cfg.train.cpu else None)


def _validate_conditioning(cfg: Config) -> None:
    n, d = cfg.model.num_classes, cfg.data
    if n and d.dataset == "digits" and n != 10:
        raise ConfigError(f"the digits have 10 classes; set model.num_classes=10 or 0 (it is {n}).")
    if n and d.dataset == "image_folder" and not d.class_labels:
        raise ConfigError("model.num_classes is set but data.class_labels is false; set data.class_labels=true "
                          "(one sub-folder per class) or model.num_classes=0.")


def _validate_train(t: TrainConfig) -> None:
    if t.resume is not None and t.overwrite:
        raise ConfigError("train.resume and train.overwrite are both set; set one: resume continues a run, overwrite replaces it.")


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _validate_model(m: ModelConfig) -> None:
    from .norms import available_norms, norm_uses_groups
    from .unet import norm_widths

    if m.norm not in available_norms():
        raise ConfigError(f"'model.norm' is {m.norm!r}; choose one of {', '.join(available_norms())}.")
    if not m.channel_mult or any(c <= 0 for c in m.channel_mult):
        raise ConfigError(f"'model.channel_mult' must be a non-empty list of positive integers, got {m.channel_mult}.")
    levels = len(m.channel_mult)
    if m.image_size % 2 ** (levels - 1):
        raise ConfigError(
            f"'model.image_size' {m.image_size} cannot be halved {levels - 1} times for {levels} levels; "
            f"use a multiple of {2 ** (levels - 1)} or fewer channel_mult entries."
        )
    resolutions = {m.image_size // 2**i for i in range(levels)}
    missing = sorted(set(m.attention_resolutions) - resolutions)
    if missing:
        raise ConfigError(
            f"'model.attention_resolutions' {missing} is not a resolution of this U-Net; choose from {sorted(resolutions)}."
        )
    _validate_attention(m)
    _validate_groups(m, norm_uses_groups, norm_widths)


def _validate_attention(m: ModelConfig) -> None:
    widths = sorted({m.base_channels * mult for i, mult in enumerate(m.channel_mult)
                     if m.image_size // 2**i in m.attention_resolutions})
    bad = [w for w in widths if w % m.attention_heads]
    if bad:
        raise ConfigError(
            f"'model.attention_heads' {m.attention_heads} does not divide attention width(s) {bad}; "
            f"use a divisor such as {math.gcd(*bad)}."
        )


def _validate_groups(m: ModelConfig, norm_uses_groups, norm_widths) -> None:
    """Group counts must divide every width a norm sees, including the skip concatenations."""
    if not norm_uses_groups(m.norm):  # batch, layer, instance, ... ignore model.groups
        return
    widths = norm_widths(m.base_channels, m.channel_mult, m.num_res_blocks)
    bad = sorted(w for w in set(widths) if w % m.groups)
    if bad:
        fit = math.gcd(*widths)
        fit = max(d for d in range(1, min(fit, m.groups) + 1) if fit % d == 0)
        raise ConfigError(
            f"'model.groups' {m.groups} does not divide the channel width(s) {bad} that a norm sees; "
            f"set model.groups={fit} or change model.base_channels/channel_mult."
        )


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.dataset == "image_folder" and not d.path:
        raise ConfigError("'data.path' must name a folder of images when data.dataset is image_folder.")
    if d.dataset == "digits" and cfg.model.in_channels != 1:
        raise ConfigError(f"the digits dataset is greyscale; set model.in_channels=1 (it is {cfg.model.in_channels}).")
    if cfg.model.in_channels not in (1, 3):
        raise ConfigError(f"'model.in_channels' must be 1 (grey) or 3 (RGB) for images, got {cfg.model.in_channels}.")


def _validate_diffusion(d: DiffusionConfig) -> None:
    if d.beta_start >= d.beta_end or d.beta_end >= 1:
        raise ConfigError(
            f"betas must satisfy 0 < beta_start < beta_end < 1, got {d.beta_start} and {d.beta_end}."
        )


def _validate_sample(cfg: Config) -> None:
    s = cfg.sample
    if s.class_labels:
        n = cfg.model.num_classes
        bad = [c for c in s.class_labels if not 0 <= c < n]
        if bad:
            what = "the model is unconditional" if n == 0 else f"labels run from 0 to {n - 1}"
            raise ConfigError(f"'sample.class_labels' {bad} are not classes of this model ({what}).")
