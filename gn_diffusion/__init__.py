"""gn_diffusion: image diffusion models whose U-Net is built around Group Normalization."""

from .config import (
    Config,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    save_config,
)
from .errors import ConfigError, UserError
from .kernels import group_norm_silu
from .norms import available_norms, make_norm, norm_act, register_norm
from .unet import GNUNet, build_unet

__version__ = "0.1.0"

__all__ = [
    "Config", "DataConfig", "DiffusionConfig", "ModelConfig", "SampleConfig", "TrainConfig",
    "config_from_dict", "load_config", "save_config", "ConfigError", "UserError",
    "group_norm_silu", "available_norms", "make_norm", "norm_act", "register_norm",
    "GNUNet", "build_unet",
]
