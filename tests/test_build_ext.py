"""The build switches of ``rcfast._C`` (build_ext.py): each one is exercised here.

The C++ side of the per-capability build (``CPU_CAPABILITY*`` and
``RCFAST_HAVE_CPU_*``) is exercised by tests/test_cpu_kernel.py, which forces
each capability at run time; this file checks the flags that produce them and
the environment switches of the build (``DEBUG``, ``RCFAST_USE_CUDA``), without
compiling anything.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import build_ext  # noqa: E402


def test_release_and_debug_flags(monkeypatch):
    monkeypatch.delenv("DEBUG", raising=False)
    release = build_ext._cxx_flags()
    assert "-O3" in release and "-O0" not in release
    monkeypatch.setenv("DEBUG", "1")
    debug = build_ext._cxx_flags()
    assert "-O0" in debug and "-g" in debug and "-O3" not in debug
    # IEEE arithmetic is part of the kernels' contract (-inf / NaN semantics).
    assert not any("fast-math" in flag for flag in release + debug)


def test_capability_defines_match_the_built_copies():
    names = [name for name, _, _ in build_ext.CPU_CAPABILITIES]
    assert names[0] == "DEFAULT"
    flags = build_ext._cxx_flags()
    for name in names[1:]:
        assert f"-DRCFAST_HAVE_CPU_{name}" in flags  # kd_cpu.cpp only calls copies announced so
    for name, source, extra in build_ext.CPU_CAPABILITIES:
        assert os.path.isfile(os.path.join(REPO_ROOT, source)), source
        if name == "AVX512":
            assert "-mavx512f" in extra
        if name == "AVX2":
            assert "-mavx2" in extra and "-mfma" in extra
    if build_ext._is_x86_64():
        assert names == ["DEFAULT", "AVX2", "AVX512"]


def test_use_cuda_switch(monkeypatch):
    monkeypatch.setenv("RCFAST_USE_CUDA", "0")
    assert build_ext.want_cuda() is False
    monkeypatch.setenv("RCFAST_USE_CUDA", "1")
    if torch.version.cuda is None or build_ext.CUDA_HOME is None:
        with pytest.raises(RuntimeError, match="RCFAST_USE_CUDA=1"):
            build_ext.want_cuda()
    else:
        assert build_ext.want_cuda() is True
    monkeypatch.delenv("RCFAST_USE_CUDA")
    expected = torch.version.cuda is not None and (torch.cuda.is_available() or build_ext.CUDA_HOME is not None)
    assert build_ext.want_cuda() is expected


def test_extension_sources(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("RCFAST_USE_CUDA", "0")
    (extension,), cmdclass = build_ext.cpp_extension_modules()
    assert extension.name == "rcfast._C"
    assert {"csrc/bindings.cpp", "csrc/cpu/kd_cpu.cpp"} <= set(extension.sources)
    assert not any(source.startswith("csrc/cuda/") for source in extension.sources)  # RCFAST_USE_CUDA=0
    assert extension.rcfast_cpu_capabilities == build_ext.CPU_CAPABILITIES
    assert cmdclass["build_ext"] is build_ext.RcfastBuildExtension
    for header in build_ext._HEADERS:
        assert os.path.isfile(os.path.join(REPO_ROOT, header)), header
    assert {"csrc/cuda/kd_cuda_op.cpp", "csrc/cuda/kd_loss_cuda.cu"} <= set(build_ext._cuda_sources())
