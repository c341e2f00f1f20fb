"""FID features as papers compute them: Inception-v3 pool3 (2048-d) through torch-fidelity.

`eval.extractor=inception` scores samples on the features of the original TensorFlow FID
(TTUR's fid.py): torch-fidelity's port of that graph, with its TF1-exact bilinear resize to
299 x 299 and (x - 128) / 128 inside the network. Our side only turns images in [-1, 1] into
what that graph was fed: uint8 RGB at their own size, quantized as the PNGs `sample` writes
(grey replicated to three channels).

The weights are torch-fidelity's conversion of the TF checkpoint: a local file named by
`eval.inception_weights` (torch-fidelity's .pth or a .safetensors copy), else the library's own
download into the torch hub cache. A user's file is read with `torch.load(weights_only=True)`
(tensors only, so unpickling runs no code); the library, which unpickles its input in full, is
handed our own re-save of those tensors, never the user's file.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import socket
import ssl
import sys
import tempfile
import types
import urllib.error
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError

FEATURES = "2048"  # torch-fidelity's name for pool3, the layer FID and KID use
DIMENSION = 2048
INSTALL = "pip install 'gn-diffusion[fid]' (next to a CPU-only torch: pip install --no-deps torch-fidelity)"


def to_inception_input(images: torch.Tensor) -> torch.Tensor:
    """[N, 1 or 3, H, W] in [-1, 1] -> uint8 [N, 3, H, W], the same size.

    The reference FID reads 8-bit image files, so the samples are quantized exactly as
    `images.to_uint8` writes them (clamp, scale by 127.5, round); grey is replicated to RGB as
    a grey PNG is read as RGB. No resize here: the network resizes to 299 itself, TF-exactly.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"Inception features need images [N, 1 or 3, H, W], got shape {list(images.shape)}.")
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class InceptionFeatures:
    """A FeatureExtractor: images [N, C, H, W] in [-1, 1] -> pool3 features [N, 2048], float32
    on the CPU, computed `batch_size` images at a time on `device`."""

    name = "inception-v3 pool3 (torch-fidelity)"

    def __init__(self, network: torch.nn.Module, batch_size: int = 50, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = to_inception_input(images)
        out = [self.network(chunk.to(self.device))[0].float().cpu() for chunk in pixels.split(self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, DIMENSION)


def inception_extractor(weights: Optional[str] = None, batch_size: int = 50, cpu: bool = False) -> InceptionFeatures:
    """The FID feature extractor; `weights` is a local weights file, None for the library's
    download or cache. On CUDA when there is a GPU, unless `cpu`."""
    library = _library()
    network = _downloaded(library) if weights is None else _from_file(library, weights)
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    return InceptionFeatures(network, batch_size, device)


# ---------------------------------------------------------------------------------------------
# The library


def _library() -> types.ModuleType:
    """torch_fidelity.feature_extractor_inceptionv3: the network and its weights' URL.

    The package's __init__ imports torchvision for other metrics' data sets and networks, which
    the Inception network does not use. PyPI's torchvision for Linux is built against CUDA torch
    and cannot load beside a CPU-only torch (and, installed there, breaks diffusers' imports),
    so a CPU-only install leaves it out (pip install --no-deps torch-fidelity); then only the
    network's own module, which needs torch alone, is imported.
    """
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] == "torch_fidelity":
            raise UserError(f"eval.extractor=inception computes its features with torch-fidelity, which is not "
                            f"installed; {INSTALL}.") from None
        if exc.name != "torchvision":
            raise
        return _without_package_init()


def _without_package_init() -> types.ModuleType:
    """The network's module, imported under a bare stand-in for its package (the folder to
    search, none of the package's imports); the stand-in is removed afterwards, so a later
    `import torch_fidelity` runs the real __init__."""
    spec = importlib.util.find_spec("torch_fidelity")  # locates the package; runs none of it
    stand_in = types.ModuleType("torch_fidelity")
    stand_in.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = stand_in
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        if sys.modules.get("torch_fidelity") is stand_in:
            del sys.modules["torch_fidelity"]


def _build(library: types.ModuleType, path: Optional[str]) -> torch.nn.Module:
    return library.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURES], feature_extractor_weights_path=path)


# ---------------------------------------------------------------------------------------------
# Weights


def _downloaded(library: types.ModuleType) -> torch.nn.Module:
    """The network with the library's own weights: from the torch hub cache, else downloaded
    into it. Offline without a cached copy, one sentence naming eval.inception_weights."""
    url = library.URL_INCEPTION_V3
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        return _build(library, None)
    except OSError as exc:
        if not _network_failure(exc):
            raise  # a disk failure while caching: evaluator_for names the path and the fix
        reason = " ".join(str(getattr(exc, "reason", exc)).split())
        raise UserError(f"eval.extractor=inception needs the Inception-v3 weights, which are not in the torch hub cache "
                        f"({cached}) and cannot be downloaded here ({reason}); download {url} on a machine that is "
                        f"online and set eval.inception_weights to the file's path.") from None


def _network_failure(exc: BaseException) -> bool:
    """Whether an OSError from the download is the network's (no DNS, no route, a refused, reset
    or timed-out connection, an HTTP error), not the disk's."""
    return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.gaierror, ssl.SSLError))


def _from_file(library: types.ModuleType, weights: str) -> torch.nn.Module:
    path = Path(weights).expanduser()
    state = _read_state_dict(path, weights, library.URL_INCEPTION_V3)
    with tempfile.TemporaryDirectory(prefix="gn_diffusion-inception-") as folder:
        # Our own file of plain tensors: the library unpickles it in full, which runs nothing of the user's.
        copy = Path(folder) / "weights.pth"
        torch.save(state, copy)
        try:
            return _build(library, str(copy))
        except RuntimeError as exc:
            if "state_dict" not in str(exc):
                raise
            detail = " ".join(str(exc).split())[:300]
            raise UserError(f"eval.inception_weights={weights} does not hold torch-fidelity's Inception-v3 weights "
                            f"({detail}); use the file from {library.URL_INCEPTION_V3}.") from None


def _read_state_dict(path: Path, shown: str, url: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a torch.save'd state dict, the latter read with
    weights_only=True: a file that needs more than tensors to unpickle is refused, not loaded."""
    if not path.is_file():
        raise UserError(f"eval.inception_weights={shown} is not a file; give the path of torch-fidelity's Inception-v3 "
                        f"weights (downloaded from {url}).")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as exc:
            raise UserError(f"eval.inception_weights={shown} is not a readable safetensors file ({exc}).") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"eval.inception_weights={shown} is not a state dict of plain tensors ({first}); it is not "
                        "loaded, since unpickling anything more could run code: use torch-fidelity's weights file "
                        "or a .safetensors copy of it.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"eval.inception_weights={shown} holds a {type(state).__name__}, not a state dict of tensors; "
                        "use torch-fidelity's Inception-v3 weights file.")
    return state
