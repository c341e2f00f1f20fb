"""gn_diffusion: image diffusion models whose U-Net is built around Group Normalization.

Names are imported on first use, so `import gn_diffusion.config` (the bottom of the import
graph) does not pull in torch or the model.
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "config": ["Config", "DataConfig", "DiffusionConfig", "EvalConfig", "ModelConfig", "RuntimeConfig",
               "SampleConfig", "TrainConfig", "config_from_dict", "load_config", "save_config"],
    "errors": ["ConfigError", "UserError"],
    "kernels": ["group_norm_silu"],
    "model.norms": ["available_norms", "make_norm", "register_norm"],
    "model.unet": ["GNUNet", "build_unet"],
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gn_diffusion' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
