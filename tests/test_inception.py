"""eval.extractor=inception: FID's Inception-v3 pool3 features through torch-fidelity.

The real weights cannot be downloaded here, so the network is checked with weights made up of
random tensors (saved to a temporary file and named by eval.inception_weights, as a user's
file would be): the image side, the shapes and the refusals are what is under test, not the
values of real FID.
"""

from __future__ import annotations

import math
import socket
import sys
import urllib.error

import pytest
import torch

import gn_diffusion.sample.generate as generation
from gn_diffusion.config import EvalConfig, load_config
from gn_diffusion.errors import ConfigError, UserError
from gn_diffusion.evaluate import command as evaluate
from gn_diffusion.evaluate.inception import DIMENSION, to_inception_input
from gn_diffusion.evaluate.metric import evaluator_for, load_extractor
from gn_diffusion.images import to_uint8

from conftest import assert_fails_cleanly



def library():
    from gn_diffusion.evaluate.inception import _library

    return _library()


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A state dict of the library's network with random He-scaled convs (the default init
    shrinks the activations to ~1e-8 over 94 layers), saved with torch.save as a user's .pth."""
    lib = library()
    with pytest.MonkeyPatch.context() as patch:  # build the bare network: no download, nothing loaded
        patch.setattr(lib, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(lib.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *args, **kwargs: None)
        state = lib.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    g = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith("conv.weight"):
            value.copy_(torch.randn(value.shape, generator=g) * math.sqrt(2 / value[0].numel()))
    path = tmp_path_factory.mktemp("weights") / "inception.pth"
    torch.save(state, path)
    return path




@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """A torch hub cache without the library's weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


# ---------------------------------------------------------------------------------------------
# The image side


def test_images_become_uint8_rgb_at_their_own_size_quantized_as_saved_pngs():
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(4, 1, 5, 7, generator=g) * 2.4 - 1.2  # some outside [-1, 1]: clamped
    pixels = to_inception_input(grey)
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 5, 7)  # no resize: the network does it
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])
    assert torch.equal(pixels[:, :1].permute(0, 2, 3, 1), torch.from_numpy(to_uint8(grey)))
    assert pixels.min() == 0 and pixels.max() == 255
    rgb = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1
    assert torch.equal(to_inception_input(rgb).permute(0, 2, 3, 1), torch.from_numpy(to_uint8(rgb)))
    for bad in (torch.zeros(2, 2, 4, 4), torch.zeros(3, 4, 4)):
        with pytest.raises(UserError, match=r"\[N, 1 or 3, H, W\]"):
            to_inception_input(bad)


def test_config_takes_inception_and_checks_its_settings():
    cfg = load_config(None, ["eval.extractor=inception", "eval.inception_weights=/w.pth", "eval.inception_batch_size=8"])
    assert (cfg.eval.extractor, cfg.eval.inception_weights, cfg.eval.inception_batch_size) == ("inception", "/w.pth", 8)
    for bad in (["eval.inception_batch_size=0"], ["eval.extractor=inceptionv3"]):
        with pytest.raises(ConfigError):
            load_config(None, bad)


# ---------------------------------------------------------------------------------------------
# The network, with random weights


def test_features_are_2048_wide_and_finite_from_a_resized_normalized_rgb_input(random_weights):
    extractor = load_extractor("inception", 8, 1, EvalConfig(inception_weights=str(random_weights),
                                                             inception_batch_size=2), cpu=True)
    seen = []
    extractor.network.Conv2d_1a_3x3.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    features = extractor(images)
    assert features.shape == (3, DIMENSION) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.std() > 1e-3
    # The library resized the 8x8 grey images to 299x299 RGB and mapped uint8 to (x - 128) / 128.
    assert [x.shape[0] for x in seen] == [2, 1] and seen[0].shape[1:] == (3, 299, 299)
    first = torch.cat(seen)
    assert first.min() >= -1 and first.max() <= 127 / 128
    assert torch.equal(first[:, 0], first[:, 1]) and torch.equal(first[:, 0], first[:, 2])
    assert torch.allclose(extractor(images[:1]), features[:1], atol=1e-5)  # batching changes nothing


def test_a_safetensors_copy_gives_the_same_features(random_weights, tmp_path):
    from safetensors.torch import save_file

    save_file(torch.load(random_weights, weights_only=True), tmp_path / "inception.safetensors")
    images = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    a, b = (load_extractor("inception", 12, 3, EvalConfig(inception_weights=str(p)), cpu=True)(images)
            for p in (random_weights, tmp_path / "inception.safetensors"))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Refusals: each one sentence


def test_offline_without_weights_is_one_sentence(run_dir, tmp_path, capsys, monkeypatch, empty_hub):
    def offline(*args, **kwargs):  # what torch.hub raises here, where no name resolves
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(library(), "load_state_dict_from_url", offline)
    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("sampled before the extractor was built"))
    assert_fails_cleanly(capsys, evaluate.main, [str(run_dir), "eval.extractor=inception", "eval.num_images=4"],
                         "cannot be downloaded here ([Errno -2] Name or service not known)", tmp_path)


def test_no_network_at_all_reaches_the_same_sentence(monkeypatch, empty_hub, tmp_path):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)  # below urllib: the library's real download path runs
    cfg = load_config(None, ["model.image_size=8", "eval.extractor=inception"])
    with pytest.raises(UserError) as caught:
        evaluator_for(cfg)
    message = str(caught.value)
    assert "\n" not in message and "eval.inception_weights" in message and library().URL_INCEPTION_V3 in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in message


def test_a_file_that_needs_full_unpickling_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # full unpickling would call open(marker, "w")
            return open, (str(marker), "w")

    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="is not a state dict of plain tensors .* not loaded, since unpickling"):
        load_extractor("inception", 8, 1, EvalConfig(inception_weights=str(tmp_path / "evil.pth")))
    assert not marker.exists()


@pytest.mark.parametrize("case", ["other_tensors", "missing", "truncated", "not_a_dict", "bad_safetensors"])
def test_weights_that_are_not_the_network_are_one_sentence(tmp_path, case):
    path = tmp_path / ("weights.safetensors" if case == "bad_safetensors" else "weights.pth")
    if case == "other_tensors":
        torch.save({"layer.weight": torch.zeros(3)}, path)
    elif case in ("truncated", "bad_safetensors"):
        torch.save({"layer.weight": torch.zeros(300)}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "not_a_dict":
        torch.save([torch.zeros(3)], path)
    expected = {"other_tensors": "does not hold torch-fidelity's Inception-v3 weights", "missing": "is not a file",
                "truncated": "is not a state dict of plain tensors", "not_a_dict": "holds a list, not a state dict",
                "bad_safetensors": "is not a readable safetensors file"}[case]
    with pytest.raises(UserError, match=expected) as caught:
        load_extractor("inception", 8, 1, EvalConfig(inception_weights=str(path)))
    assert "\n" not in str(caught.value)


class Absent:
    """A meta-path finder for which the named packages are not installed (as the import system says it)."""

    def __init__(self, *names):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def forget(monkeypatch, package):
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)


def test_without_torch_fidelity_the_sentence_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(sys, "meta_path", [Absent("torch_fidelity"), *sys.meta_path])
    forget(monkeypatch, "torch_fidelity")
    with pytest.raises(UserError, match=r"torch-fidelity, which is not installed; pip install 'gn-diffusion\[fid\]'"):
        load_extractor("inception", 8, 1)


def test_the_network_loads_without_torchvision(monkeypatch):
    """torch-fidelity's __init__ imports torchvision; the network's own module does not need it."""
    monkeypatch.setattr(sys, "meta_path", [Absent("torchvision"), *sys.meta_path])
    forget(monkeypatch, "torchvision")
    forget(monkeypatch, "torch_fidelity")
    module = library()
    assert module.__name__ == "torch_fidelity.feature_extractor_inceptionv3"
    assert hasattr(module, "FeatureExtractorInceptionV3") and "torch_fidelity" not in sys.modules
