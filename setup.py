"""Build and install rcfast.

``rcfast._C`` (the C++ CPU kernel; the CUDA kernel too when torch has CUDA and a
toolkit is found) is built with ``torch.utils.cpp_extension``. Build switches are
environment variables:

- ``RCFAST_SKIP_EXTENSION=1``: install the pure-Python package only (the
  ``reference`` backend; Triton too where it runs).
- ``RCFAST_USE_CUDA=0|1``: force the CUDA kernel off/on (default: on when
  ``torch.cuda.is_available()`` or ``CUDA_HOME`` is set and torch has CUDA).
- ``DEBUG=1``: ``-O0 -g``.

Install for development with ``pip install --no-build-isolation -e .`` so the
build uses the torch already installed (build isolation would fetch another).
"""
import os
import sys

from setuptools import setup

PACKAGES = [
    "rcfast", "rcfast.ops", "rcfast.losses", "rcfast.models", "rcfast.data",
    "rcfast.train", "rcfast.eval", "rcfast.kernels",
]


def extension_modules():
    """``(ext_modules, cmdclass)``: rcfast._C, built by build_ext.py (per-CPU-capability
    kernel objects need per-file flags, which plain setuptools lacks)."""
    if os.environ.get("RCFAST_SKIP_EXTENSION") == "1":
        return [], {}
    # pip's PEP 517 legacy backend runs this file without its folder on sys.path.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from build_ext import cpp_extension_modules  # noqa: E402  (build logic in build_ext.py)
    return cpp_extension_modules()


ext_modules, cmdclass = extension_modules()

setup(
    name="rcfast",
    version="0.1.0",
    description="Fast representation-consolidation distillation: fused multi-teacher multi-head KD loss",
    packages=PACKAGES,
    package_dir={"rcfast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm", "scikit-learn", "pillow", "pot"],
    extras_require={
        "test": ["pytest", "hypothesis", "expecttest"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "dali": ["nvidia-dali-cuda120"],
        "triton": ["triton"],
    },
    entry_points={"console_scripts": ["rcfast = rcfast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
