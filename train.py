"""Train a diffusion model: python train.py [CONFIG] [section.key=value ...]

Several processes: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train.py
(the same command without ACCELERATE_USE_CPU=1 uses GPUs).
"""

from gn_diffusion.cli import run_cli, run_settings, split_args

DEFAULT_CONFIG = "configs/digits.yaml"


def main(argv: list[str]) -> None:
    """python train.py [CONFIG] [section.key=value ...]  (CONFIG: configs/digits.yaml)

    Trains on the config's data and leaves <train.output_dir>/model (safetensors) and a sample
    grid at <train.output_dir>/samples/final.png. Continue a run with train.resume=auto; replace
    one with train.overwrite=true.
    """
    from gn_diffusion.config import load_config
    from gn_diffusion.train.loop import train

    path, overrides = split_args(argv, DEFAULT_CONFIG)
    train(load_config(path, overrides))


main.settings = run_settings(default_config=DEFAULT_CONFIG)  # --help lists every key, with the config's values

if __name__ == "__main__":
    run_cli(main)
