"""Shared test helpers and fixtures.

Small models on a 2-core machine: one OpenMP thread is faster and does not collapse when
another process shares the CPU (measured: up to 100x slower with two threads under load).
Subprocesses the tests start inherit the setting.
"""

import hashlib
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import yaml  # noqa: E402
import torch  # noqa: E402  (after the variable, so OpenMP reads it)

from gn_diffusion.cli import run_cli  # noqa: E402
from gn_diffusion.config import load_config  # noqa: E402
from gn_diffusion.files import atomic_path  # noqa: E402
from gn_diffusion.model.unet import build_unet  # noqa: E402
from gn_diffusion.runtime import set_cpu_threads  # noqa: E402

set_cpu_threads(int(os.environ["OMP_NUM_THREADS"]))

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# A digits run that trains a step in milliseconds; used by every training and sampling test.
TINY = [
    "model.image_size=8", "model.base_channels=16", "model.groups=8", "model.channel_mult=[1]",
    "model.num_res_blocks=1", "model.attention_resolutions=[]", "diffusion.num_train_timesteps=100",
    "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2", "train.sample_num_images=4",
    "sample.num_images=4", "sample.num_inference_steps=3",
]


def tiny_config(output_dir, *overrides):
    """The TINY digits run writing to `output_dir`, with more overrides."""
    return load_config(ROOT / "configs" / "digits.yaml", [*TINY, f"train.output_dir={output_dir}", *overrides])


def random_model(cfg):
    """A model with non-trivial weights (the U-Net's output convs start at zero)."""
    torch.manual_seed(1)
    model = build_unet(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def launch_two_processes(function, *args):
    """Run `function(*args)` on two gloo processes with accelerate.debug_launcher, in a fresh
    interpreter: debug_launcher forks, and a fork of a process that has already run OpenMP
    work (as pytest's has) hangs in the child's first parallel op."""
    code = (f"from accelerate import debug_launcher; import {function.__module__} as m; "
            f"debug_launcher(m.{function.__name__}, args={args!r}, num_processes=2)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=600)


def in_each_process(record_dir: str):
    """Start of a two-process function: check there are two ranks and leave a mark per rank."""
    from accelerate.state import PartialState

    state = PartialState(cpu=True)
    assert state.num_processes == 2
    (Path(record_dir) / f"rank-{state.process_index}-ran").touch()


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`, and "folder" for every folder (an
    empty folder a refusal left behind counts as a change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_dir()}


def script_main(name):
    """The `main` of an entry script (train.py, sample.py) or of a `python -m` module's file."""
    return runpy.run_path(str(ROOT / name), run_name="not_main")["main"]


def assert_fails_cleanly(capsys, main, args, message, keep: Path):
    """`main` (an entry script's name, or a main function) refuses `args`: exit 2, one `error:`
    line holding `message`, no traceback, and every file under `keep` byte-identical."""
    before = snapshot(keep)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script_main(main) if isinstance(main, str) else main, args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(keep) == before


@pytest.fixture
def run_dir(tmp_path):
    """A finished-looking tiny run (unconditional, 100 training timesteps): config.yaml and an
    exported model with non-trivial weights."""
    from gn_diffusion.config import save_config
    from gn_diffusion.sample.model_folder import export_model

    out = tmp_path / "run"
    cfg = tiny_config(out, "train.max_steps=1")
    export_model(random_model(cfg), cfg, out / "model")
    save_config(cfg, out / "config.yaml")
    return out


# The ablation's tiny sweep: two norms x two batch sizes on a U-Net of 8 channels.
TINY_SWEEP = {
    "base": {
        "model": {"image_size": 8, "base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                  "attention_resolutions": [], "groups": 4},
        "train": {"lr": 1e-3, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 1000, "sample_every": 1000},
        "sample": {"num_inference_steps": 2, "num_images": 4},
        "runtime": {"cpu_threads": 1},
    },
    "grid": {"norms": ["group", "batch"], "batch_sizes": [2, 4], "images_seen": 16, "base_batch_size": 4},
    "eval": {"num_images": 20, "kid_subsets": 5},
    "loss_triples": 32,
}


def shared_classifier_cache(tmp_path_factory) -> Path:
    """One digits-classifier cache for every test process of the session (pytest-xdist's workers
    share the parent of their base folders), seeded with the 8x8 classifier that training writes
    (tests/data: the file `digits_classifier` itself saved; its name holds the hash of the network,
    recipe, data and training code, so a change to any of them misses it and trains afresh, once,
    under its lock).
    Training from scratch is tested on its own (test_evaluation)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "classifier-cache"
    cache.mkdir(parents=True, exist_ok=True)
    for shipped in (TESTS / "data").glob("digits_cnn-*.safetensors"):
        if not (cache / shipped.name).exists():
            with atomic_path(cache / shipped.name) as tmp:  # a worker reading it sees all or nothing
                shutil.copyfile(shipped, tmp)
    return cache


@pytest.fixture(scope="session", autouse=True)
def classifier_cache_for_every_command(tmp_path_factory):
    """Commands the tests run without eval.cache_dir (in this process or a child) use the shared
    cache too, not the user's ~/.cache."""
    os.environ["GN_DIFFUSION_CACHE"] = str(shared_classifier_cache(tmp_path_factory))


@pytest.fixture
def tiny_sweep_config(tmp_path, tmp_path_factory):
    raw = {**TINY_SWEEP, "output_dir": str(tmp_path / "sweep")}
    raw["eval"] = {**TINY_SWEEP["eval"], "cache_dir": str(shared_classifier_cache(tmp_path_factory))}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
