"""Sample from a trained model: python sample.py RUN_OR_MODEL_DIR [sample.key=value ...]"""

from gn_diffusion.cli import run_cli, run_settings, split_args


def main(argv: list[str]) -> None:
    """python sample.py RUN_OR_MODEL_DIR [sample.key=value ...]

    Takes the sample.* and runtime.* keys listed below (e.g. sample.scheduler=ddpm,
    sample.class_labels=[3,7]); with RUN_OR_MODEL_DIR before --help, beside each default is the
    value that run would sample with. Writes grid.png, images/<index>.png and samples.npz in
    sample.output_dir (default <run>/generated). Several processes: accelerate launch ... sample.py ...

    Everything is checked before the model is loaded: the step count against what the scheduler
    takes, and the output folder, which must be new, empty or hold only an earlier set of these
    files (replaced whole: the new set is written beside it and swapped in) and be writable.
    """
    from gn_diffusion.errors import UserError
    from gn_diffusion.sample.command import sample_main

    path, overrides = split_args(argv, None)
    if path is None:
        raise UserError("sample.py needs a run's output folder or model folder first, e.g. python sample.py runs/digits.")
    sample_main(path, overrides)


def _config_of(path: str, overrides: list[str]):
    from gn_diffusion.sample.command import sample_config

    return sample_config(path, overrides)


main.settings = run_settings("sample.", "runtime.", config_of=_config_of)  # --help lists these keys

if __name__ == "__main__":
    run_cli(main)
