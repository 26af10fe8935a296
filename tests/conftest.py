"""Test-session set-up shared by every test file.

Triton kernels run on CPU tensors only through the interpreter, and the variable
must be set before any kernel is decorated, so it is set here, before anything
imports rcfast.kernels. On a machine with a GPU the real kernels run instead.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread, and restore the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
