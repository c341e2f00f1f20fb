"""The configuration schema: typed dataclasses, YAML loading, dotted overrides, and the checks
that need nothing but the settings themselves.

This module imports nothing of the model. Fixed choices are `Literal` types and numeric ranges
are field metadata, both judged while the YAML is read; checks that need the model (channel
widths, norm names) live in `unet` and `norms`, and checks that need the hardware run where the
hardware is used. Settings that say how a run executes on this machine, not what it is, live in
the `runtime` section, which every command lets the user override.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError
from .files import write_text_atomic
from .old_keys import move_old_keys, new_name
from .yaml_files import load_yaml, read_yaml_mapping
from .typed import build_typed, non_negative, positive, quoted, seed_setting, setting, unit_interval

# Choices that a registry below the config keys by name: the names live here, and tests check that
# diffusion.schedules and kernels hold exactly these (test_config).
SchedulerName = Literal["ddpm", "ddim", "dpm-solver++", "euler", "heun", "unipc"]
NormBackend = Literal["auto", "triton", "torch"]


@dataclass
class ModelConfig:
    image_size: int = positive(16)  # pixels per side; halved once per extra channel_mult level
    in_channels: int = positive(1)  # 1 (grey) or 3 (RGB)
    out_channels: Optional[int] = positive(None)  # None: same as in_channels
    base_channels: int = positive(64)  # the first level's width; channel_plan gives every other
    channel_mult: list[int] = setting(factory=lambda: [1, 2], low=1)  # width multiplier per resolution level
    num_res_blocks: int = positive(2)  # residual blocks per level on the way down
    attention_resolutions: list[int] = setting(factory=lambda: [8], low=1)  # resolutions with self-attention (the middle block always has it)
    attention_heads: int = positive(1)  # heads of every attention block
    dropout: float = unit_interval(0.0)  # in every residual block, before its last conv
    norm: str = "group"  # a name of the norm registry (norms.available_norms)
    # Group norm's grouping: `groups` per layer, or `channels_per_group` (width C: C / it groups); neither: groups=32.
    groups: Optional[int] = positive(None)  # groups per norm layer (None with neither given: 32)
    channels_per_group: Optional[int] = positive(None)  # or channels per group: C / this groups per layer
    norm_eps: float = positive(1e-5)  # added to the variance in every norm
    scale_shift: bool = True  # AdaGN; false gives DDPM's additive timestep conditioning
    num_classes: int = non_negative(0)  # 0: unconditional
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, more time

    def __post_init__(self):
        # Resolved here: a saved config names the grouping it ran with; older configs load unchanged.
        if self.groups is not None and self.channels_per_group is not None:
            raise ConfigError(
                f"'model.groups' ({self.groups}) and 'model.channels_per_group' ({self.channels_per_group}) are both "
                "set; keep one and set the other to null (model.groups=null to use channels_per_group)."
            )
        if self.groups is None and self.channels_per_group is None:
            self.groups = DEFAULT_GROUPS


DEFAULT_GROUPS = 32  # Wu & He's default


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = positive(1000)  # T, the forward process's steps
    beta_schedule: Literal["linear", "cosine"] = "linear"  # cosine is diffusers' squaredcos_cap_v2
    beta_start: float = positive(1e-4)  # the linear schedule's first beta
    beta_end: float = positive(0.02)  # the linear schedule's last beta
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"  # what the model predicts
    snr_gamma: Optional[float] = positive(None)  # min-SNR-gamma loss weighting (Hang et al. 2023); None: off
    offset_noise: float = non_negative(0.0)  # std of a per-(sample, channel) constant added to the noise
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2024); needs v_prediction


@dataclass
class DataConfig:
    dataset: Literal["digits", "image_folder", "hf"] = "digits"  # digits | image_folder | hf (see README: data sources)
    path: Optional[str] = None  # image_folder: a folder; hf: a save_to_disk folder, data files or a Hub name
    random_flip: bool = False  # horizontal flips, drawn on the training device
    class_labels: bool = False  # image_folder: one class per sub-folder
    num_workers: int = non_negative(0)  # DataLoader workers that decode images (0: in the main process)
    max_image_pixels: int = positive(64_000_000)  # larger images are skipped (decompression bombs)
    random_crop: int = non_negative(0)  # pixels of reflect padding a random crop shifts by; 0: off
    split: str = "train"  # hf: the split to train on
    image_column: Optional[str] = None  # hf: None takes the first Image column
    label_column: Optional[str] = None  # hf: None takes the first ClassLabel column (when model.num_classes > 0)


@dataclass
class TrainConfig:
    output_dir: str = "runs/digits"  # the run folder
    seed: int = seed_setting(0)  # weights, batches and noise all follow it
    batch_size: int = positive(32)  # per device
    gradient_accumulation_steps: int = positive(1)  # micro-batches per optimizer step
    max_steps: int = positive(4000)  # optimizer steps of the whole run
    lr: float = positive(2e-4)  # AdamW's learning rate after the warm-up
    warmup_steps: int = non_negative(200)  # linear warm-up from 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after the warm-up (diffusers' get_scheduler)
    weight_decay: float = non_negative(0.0)  # AdamW's decoupled weight decay
    adam_beta1: float = unit_interval(0.9)  # AdamW's first-moment decay
    adam_beta2: float = unit_interval(0.999)  # AdamW's second-moment decay
    grad_clip: float = non_negative(1.0)  # 0 disables clipping
    ema_halflife_images: int = positive(10_000)  # the EMA's half-life in training images (over all processes)
    ema_rampup: float = non_negative(0.05)  # the half-life is at most this share of images seen; 0: off
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate's autocast; norms keep float32 statistics
    label_dropout: float = unit_interval(0.1)  # class-conditional models: fraction of labels replaced by null
    log_every: int = positive(50)  # steps between logged losses (the only host reads of the loss)
    sample_every: int = positive(1000)  # steps between sample grids in samples/
    sample_num_images: int = positive(16)  # images in the grids written every sample_every steps
    checkpoint_every: int = positive(1000)  # steps between checkpoints
    keep_checkpoints: int = positive(2)  # the newest this many are kept
    max_bad_steps: int = non_negative(20)  # skipped non-finite steps in a row before the run stops
    resume: Optional[str] = None  # None | "auto" | a checkpoint folder
    init_from: Optional[str] = None  # start from an exported model, its run folder or a checkpoint (not a resume)
    overwrite: bool = False  # delete an earlier run's files in output_dir and start over
    log_with: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # the tracker (in logs/), through accelerate

    def images_per_step(self, processes: int) -> int:
        """Images one optimizer step sees over all processes: the effective batch."""
        return self.batch_size * self.gradient_accumulation_steps * processes


@dataclass
class SampleConfig:
    scheduler: SchedulerName = "ddim"  # the diffusers sampler
    num_inference_steps: int = positive(50)  # denoising steps
    num_images: int = positive(64)  # images to generate
    batch_size: int = positive(64)  # images denoised at once
    seed: int = seed_setting(0)  # image i's noise is seeded by (seed, i)
    class_labels: Optional[list[int]] = None  # cycled over the images; None: unconditional
    guidance_scale: float = non_negative(1.0)  # classifier-free guidance; 1 is none (class-conditional models)
    output_dir: Optional[str] = None  # None: <run dir>/generated
    use_ema: bool = True  # the EMA weights; false: the latest checkpoint's raw weights


@dataclass
class EvalConfig:
    num_images: int = setting(500, low=2)  # images generated per evaluation; the floor uses as many real ones
    kid_subsets: int = setting(100, low=2)  # random subsets KID is averaged over
    kid_subset_size: int = setting(100, low=2)  # capped at the smaller of the two sets
    coverage_share: float = setting(0.25, low=0, high=1, low_open=True)  # a class is covered at >= this share of N/K
    seed: int = seed_setting(0)  # picks the floor's real images and the KID subsets
    extractor: Optional[str] = None  # "inception", "classifier" (trained on labelled data) or "module:factory"
    cache_dir: Optional[str] = None  # None: $GN_DIFFUSION_CACHE or ~/.cache/gn_diffusion
    reference_dir: Optional[str] = None  # image-folder models: held-out real images to compare with
    reference_split: Optional[str] = None  # hf models: the held-out split of data.path to compare with
    inception_weights: Optional[str] = None  # eval.extractor=inception: a local Inception-v3 weights file; None: download
    inception_batch_size: int = positive(50)  # eval.extractor=inception: images per Inception forward (lower it if memory runs out)


@dataclass
class RuntimeConfig:
    """How a run executes on this machine, not what it is: changeable on resume, when sampling
    and when evaluating, and never part of a model's identity."""

    backend: NormBackend = "auto"  # group_norm_silu: auto is Triton on CUDA
    cpu: bool = False  # run on the CPU even where a GPU is present
    cpu_threads: int = non_negative(0)  # torch's CPU threads, at most the machine's logical CPUs; 0 keeps torch's own choice (one per core)
    compile: Literal["none", "default", "max-autotune", "reduce-overhead"] = "none"  # torch.compile mode; reduce-overhead is CUDA graphs
    channels_last: bool = False  # channels_last model and batches
    # Off by default: a GPU user mostly wants the speed, and the CPU's kernels are deterministic anyway.
    deterministic: bool = False  # true: bit-exact resume on CUDA too (torch.use_deterministic_algorithms; no cudnn.benchmark, TF32 or max-autotune); CPU runs are bit-exact either way


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `key=value` overrides,
    and check the result."""
    raw = read_yaml(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and check a Config from a nested dict (as written by `Config.to_dict`, or an older
    run's config.yaml, whose moved keys are read under their new names)."""
    cfg = build_typed(Config, move_old_keys(raw), prefix="")
    validate(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A checked copy of `cfg` with `section.key=value` overrides applied."""
    return config_from_dict(apply_overrides(cfg.to_dict(), overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set each `dotted.key=value` override in the nested dict `raw` (in place); returns `raw`."""
    for item in overrides:
        _set_dotted(raw, *parse_override(item))
    return raw


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def read_yaml(path: Path, *, saved: bool = False) -> dict[str, Any]:
    """A config file's settings, with older configs' moved keys under their new names (see
    move_old_keys for `saved`)."""
    return move_old_keys(read_yaml_mapping(path), saved=saved)


def load_saved_config(path: str | Path) -> Config:
    """The config.yaml a run wrote in its run folder or model folder. Keys an older version saved
    are read under their new names without a note, and retired ones dropped: they said how it
    trained, not what the model is, and the run or model must stay usable."""
    return config_from_dict(read_yaml(Path(path), saved=True))


def parse_override(item: str) -> tuple[str, Any]:
    """(dotted key, YAML value) of `key=value`; a moved key is given its new name."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not of the form section.key=value, e.g. train.lr=1e-4.")
    try:
        value = load_yaml(text, f"override '{key}'") if text.strip() else None
    except yaml.YAMLError:
        value = text  # a plain string that YAML cannot read, such as 'a: b'
    return new_name(key), value


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
# Checks across settings (no model or hardware needed)


def validate(cfg: Config) -> None:
    if not cfg.model.channel_mult:
        raise ConfigError("'model.channel_mult' must be a non-empty list of positive integers, got [].")
    _validate_data(cfg)
    _validate_output(cfg)
    _validate_diffusion(cfg.diffusion)
    _validate_sample(cfg)
    _validate_train(cfg.train)
    _validate_conditioning(cfg)
    _validate_extractor(cfg)


def _validate_conditioning(cfg: Config) -> None:
    n, d = cfg.model.num_classes, cfg.data
    if n and d.dataset == "digits" and n != 10:
        raise ConfigError(f"the digits have 10 classes; set model.num_classes=10 or 0 (it is {n}).")
    if n and d.dataset == "image_folder" and not d.class_labels:
        raise ConfigError("model.num_classes is set but data.class_labels is false; set data.class_labels=true "
                          "(one sub-folder per class) or model.num_classes=0.")


def _validate_train(t: TrainConfig) -> None:
    if t.resume is not None and t.init_from is not None:
        raise ConfigError("train.resume and train.init_from are both set; set one: resume continues this run, "
                          "init_from starts a new run from other weights.")
    if t.resume is not None and t.overwrite:
        raise ConfigError("train.resume and train.overwrite are both set; set one: resume continues a run, overwrite replaces it.")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.dataset == "image_folder" and not d.path:
        raise ConfigError("'data.path' must name a folder of images when data.dataset is image_folder.")
    if d.dataset == "hf" and not d.path:
        raise ConfigError("'data.path' must name a data set (a save_to_disk folder or a Hub name) when data.dataset is hf.")
    if d.random_crop >= cfg.model.image_size:
        raise ConfigError(f"'data.random_crop' pads by {d.random_crop} pixels, which must be less than "
                          f"model.image_size={cfg.model.image_size}; a few pixels (2 to 4 at 32x32) is usual.")
    if d.dataset == "digits" and cfg.model.in_channels != 1:
        raise ConfigError(f"the digits dataset is greyscale; set model.in_channels=1 (it is {cfg.model.in_channels}).")
    if cfg.model.in_channels not in (1, 3):
        raise ConfigError(f"'model.in_channels' must be 1 (grey) or 3 (RGB) for images, got {cfg.model.in_channels}.")


def _validate_output(cfg: Config) -> None:
    m, kind = cfg.model, cfg.diffusion.prediction_type
    if m.out_channels is not None and m.out_channels != m.in_channels:
        what = {"epsilon": "the noise", "v_prediction": "v", "sample": "the clean image"}[kind]
        raise ConfigError(f"'model.out_channels' is {m.out_channels} but the model predicts {what} "
                          f"(diffusion.prediction_type={kind}), which has model.in_channels={m.in_channels} channels; "
                          "set model.out_channels=null (the same as in_channels).")


def _validate_diffusion(d: DiffusionConfig) -> None:
    if d.rescale_betas_zero_snr and d.prediction_type != "v_prediction":
        raise ConfigError("diffusion.rescale_betas_zero_snr makes the last timestep pure noise (SNR 0), where "
                          f"{d.prediction_type} prediction has nothing to learn (0/0); set diffusion.prediction_type=v_prediction.")
    if d.beta_start >= d.beta_end or d.beta_end >= 1:
        raise ConfigError(
            f"betas must satisfy 0 < beta_start < beta_end < 1, got {d.beta_start} and {d.beta_end}."
        )


def _validate_sample(cfg: Config) -> None:
    s = cfg.sample
    if s.scheduler == "heun" and cfg.diffusion.rescale_betas_zero_snr:
        raise ConfigError("diffusers' heun sampler has no zero-terminal-SNR schedule (diffusion.rescale_betas_zero_snr); "
                          "choose sample.scheduler=euler, ddim or unipc.")
    if s.guidance_scale != 1.0 and not cfg.model.num_classes:
        raise ConfigError(f"'sample.guidance_scale' is {s.guidance_scale} but the model is unconditional; "
                          "guidance needs a class-conditional model (model.num_classes > 0), so leave it at 1.")
    if s.class_labels:
        n = cfg.model.num_classes
        bad = [c for c in s.class_labels if not 0 <= c < n]
        if bad:
            what = "the model is unconditional" if n == 0 else f"labels run from 0 to {n - 1}"
            raise ConfigError(f"'sample.class_labels' {quoted(bad)} are not classes of this model ({what}); "
                              "give classes it has, or none.")


def _validate_extractor(cfg: Config) -> None:
    e, d = cfg.eval, cfg.data
    if e.extractor is not None and e.extractor not in ("inception", "classifier") and ":" not in e.extractor:
        raise ConfigError(f"'eval.extractor' is {e.extractor!r}; write it as module:factory, e.g. my_feats:make, "
                          "inception for FID's Inception-v3 features or classifier for labelled data.")
    if e.extractor == "classifier" and d.dataset == "image_folder" and not d.class_labels:
        raise ConfigError("eval.extractor=classifier trains on the data's labels; set data.class_labels=true (one "
                          "sub-folder per class), or for unlabelled data eval.extractor=inception or a module:factory.")
