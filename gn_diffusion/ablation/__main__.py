"""python -m gn_diffusion.ablation: see command.py."""

from ..cli import run_cli
from .command import main

if __name__ == "__main__":
    run_cli(main)
