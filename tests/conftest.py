"""Shared fixtures: a fresh random seed per test (printed on failure), CPU placement for the CPU
suite, and the `gpu` / `multigpu` markers that skip themselves without CUDA devices."""

from __future__ import annotations

import secrets

import jax
import numpy as np
import pytest


def cuda_devices() -> list:
    try:
        return jax.devices("cuda")
    except RuntimeError:
        return []


def pytest_collection_modifyitems(config, items):
    n = len(cuda_devices())
    for item in items:
        if "gpu" in item.keywords and n < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "multigpu" in item.keywords and n < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA devices"))


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded freshly for every test; the seed is in the report if the test fails."""
    seed = secrets.randbits(63)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _place(request):
    """CPU tests run on the CPU device even where a GPU is the default; GPU tests on the GPU."""
    if "gpu" in request.keywords or "multigpu" in request.keywords:
        devs = cuda_devices()
        if not devs:
            pytest.skip("needs a CUDA device")
        with jax.default_device(devs[0]):
            yield
    else:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
