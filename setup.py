"""Build rcfast's extension; the metadata is in pyproject.toml (PEP 621).

``rcfast._C`` (the C++ CPU kernels; the CUDA kernels too when torch has CUDA and
a toolkit is found) is built with ``torch.utils.cpp_extension`` by
``build_ext.py``. Build switches are environment variables:

- ``RCFAST_SKIP_EXTENSION=1``: install the pure-Python package only (the
  ``reference`` backend; Triton too where it runs).
- ``RCFAST_USE_CUDA=0|1``: force the CUDA kernels off/on (default: on when
  ``torch.cuda.is_available()`` or ``CUDA_HOME`` is set and torch has CUDA).
- ``DEBUG=1``: ``-O0 -g``.

Install for development with ``pip install --no-build-isolation -e .`` so the
build uses the torch already installed (build isolation would fetch another).
"""
import os
import sys

from setuptools import find_packages, setup


def extension_modules():
    """``(ext_modules, cmdclass)``: rcfast._C, built by build_ext.py (per-CPU-capability
    kernel objects need per-file flags, which plain setuptools lacks)."""
    if os.environ.get("RCFAST_SKIP_EXTENSION") == "1":
        return [], {}
    # pip's PEP 517 backend runs this file without its folder on sys.path.
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from build_ext import cpp_extension_modules  # noqa: E402  (build logic in build_ext.py)
    return cpp_extension_modules()


ext_modules, cmdclass = extension_modules()

setup(
    # Every rcfast.* package under rcfast/, plus the Triton kernels, which live in
    # kernels/ and install as rcfast.kernels.
    packages=find_packages(include=["rcfast", "rcfast.*"]) + ["rcfast.kernels"],
    package_dir={"rcfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
