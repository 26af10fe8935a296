"""Test-session set-up shared by every test file.

Triton kernels run on CPU tensors only through the interpreter, and the variable
must be set before any kernel is decorated, so it is set here, before anything
imports rcfast.kernels. On a machine with a GPU the real kernels run instead.

Markers (``-m "not slow"`` runs the quick subset):

- ``slow``: takes more than a few seconds (end-to-end runs, subprocesses);
- ``interpreter``: runs a Triton kernel under ``TRITON_INTERPRET=1``. Every such
  test is also ``slow`` (added at collection below): the interpreter runs one
  program at a time in NumPy, and its ~550 tests take about 5 minutes here.
  ``-m interpreter`` runs them alone;
- ``gpu``: needs a CUDA device (skipped without one; run by scripts/gpu_check.sh).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    for marker, meaning in (
        ("slow", "takes more than a few seconds; deselect with -m 'not slow'"),
        ("interpreter", "runs a Triton kernel under TRITON_INTERPRET=1 on CPU tensors"),
        ("gpu", "needs a CUDA device; skipped without one"),
    ):
        config.addinivalue_line("markers", f"{marker}: {meaning}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets rcfast caches outside $HOME (one folder for the session)."""
    monkeypatch.setenv("RCFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rcfast-cache"))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, and restore the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
