"""Test-session set-up shared by every test file.

Triton kernels run on CPU tensors only through the interpreter, and the variable
must be set before any kernel is decorated, so it is set here, before anything
imports rcfast.kernels. On a machine with a GPU the real kernels run instead.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
