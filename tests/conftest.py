"""Shared fixtures: k-diffusion's sampling.py as a reference, Gaussian-mixture targets and
their probability-flow ODE reference solutions."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Optional

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
    return x, ode_reference(mixture2, x, SIGMA_MAX)
