"""Test-wide setup: 8 simulated CPU devices (so sharding is tested without an accelerator), float32."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gc  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _reference_available() -> bool:
    try:
        import moshi.models.loaders  # noqa: F401
        import torch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not installed"
        return False
    return True


REFERENCE_AVAILABLE = _reference_available()


def pytest_collection_modifyitems(config, items):
    # Parity tests are the proof of faithfulness: in CI (CI=true) a missing reference is an error,
    # not a skip; locally they are skipped with a clear reason.
    if REFERENCE_AVAILABLE:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError("CI needs the reference `moshi` package for the parity tests (see .ci/run)")
    skip = pytest.mark.skip(reason="reference `moshi` PyTorch package not installed (pip install ... see README)")
    for item in items:
        if "parity" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """After each test file, drop JAX's compiled executables. Each XLA:CPU executable keeps its JIT-compiled
    code mapped, so one process running the whole suite piled up more memory mappings than Linux allows
    (vm.max_map_count, 65530 by default), and the next compile's mmap failed inside LLVM: a segfault in
    tests/training/ (CI, 2026-11-27). Files rarely share a compiled function, so little is recompiled."""
    yield
    jax.clear_caches()
    gc.collect()
