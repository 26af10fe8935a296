"""Build logic of ``rcfast._C``, used by ``setup.py``'s ``extension_modules()``.

What it owns:

- the extension's sources and flags (``-O3``, OpenMP; ``DEBUG=1`` gives
  ``-O0 -g``), as a ``CppExtension`` (``CUDAExtension`` with the CUDA sources
  when CUDA is wanted: see :func:`want_cuda`);
- the **per-capability builds** of the CPU kernel. ``at::vec`` only emits SIMD
  code when a translation unit is compiled with ``CPU_CAPABILITY_AVX2`` /
  ``CPU_CAPABILITY_AVX512`` and the matching ``-m`` flags; without them it
  falls back to scalar loops (about 10x slower here). PyTorch compiles each
  kernel file once per capability and picks one at runtime (DispatchStub);
  rcfast does the same: ``csrc/cpu/kd_cpu_kernel_{default,avx2,avx512}.cpp``
  each include the kernel body under their own ``CPU_CAPABILITY`` namespace
  and are compiled with their own flags, and ``csrc/cpu/kd_cpu.cpp`` chooses
  from ``at::get_cpu_capability()`` (which honours ``ATEN_CPU_CAPABILITY``).

setuptools has no per-file flags, so :class:`RcfastBuildExtension` (a
``torch.utils.cpp_extension.BuildExtension``) compiles the capability objects
first, through the same (ninja) compiler wrapper and the extension's own flags
plus the capability's, and links them as ``extra_objects``. They come after
the default-flag objects on the link line, so where the linker merges inline
functions shared by several objects (C++ COMDAT), it keeps the
default-compiled copy, never one that needs AVX-512.

Works for ``pip install --no-build-isolation -e .`` and
``python setup.py build_ext --inplace`` alike.
"""
from __future__ import annotations

import glob
import os
import platform
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

__all__ = ["cpp_extension_modules", "RcfastBuildExtension", "CPU_CAPABILITIES", "want_cuda"]

# (name, source, flags). Flags follow PyTorch's cmake/Codegen.cmake.
_X86_CAPABILITIES = (
    ("AVX2", "csrc/cpu/kd_cpu_kernel_avx2.cpp",
     ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
      # gcc's generic tuning splits unaligned 256-bit loads/stores in two.
      "-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"]),
    ("AVX512", "csrc/cpu/kd_cpu_kernel_avx512.cpp",
     ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]),
)
_DEFAULT_CAPABILITY = ("DEFAULT", "csrc/cpu/kd_cpu_kernel_default.cpp", [])


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


# Only x86-64 gets the AVX copies; elsewhere the DEFAULT copy (at::vec's
# portable code) is the only one, and kd_cpu.cpp never refers to the others.
CPU_CAPABILITIES = (_DEFAULT_CAPABILITY,) + (_X86_CAPABILITIES if _is_x86_64() else ())

_MAIN_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/kd_cpu.cpp", "csrc/cpu/sparse_kd_cpu.cpp"]
_HEADERS = ["csrc/kd_math.h", "csrc/cpu/kd_cpu.h", "csrc/cpu/kd_cpu_op_checks.h", "csrc/cpu/kd_cpu_driver.h", "csrc/cpu/kd_cpu_passes.h",
            "csrc/cpu/kd_vec_exp.h", "csrc/cpu/sparse_kd_cpu.h", "csrc/cpu/sparse_kd_cpu_kernel_impl.h"]


def _debug() -> bool:
    return os.environ.get("DEBUG", "0") == "1"


def _cxx_flags() -> list[str]:
    optimisation = ["-O0", "-g"] if _debug() else ["-O3"]
    # No -ffast-math: the kernel's -inf/NaN semantics need IEEE arithmetic.
    flags = optimisation + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                            # as torch's own build: at::vec headers trip these
                            "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    for name, _, _ in CPU_CAPABILITIES:
        if name != "DEFAULT":
            flags.append(f"-DRCFAST_HAVE_CPU_{name}")
    return flags


def want_cuda() -> bool:
    """Whether to build the CUDA kernel: ``RCFAST_USE_CUDA=0|1`` forces it;
    otherwise when torch has CUDA and a device or a toolkit (``CUDA_HOME``)
    is present."""
    torch_has_cuda = torch.version.cuda is not None
    forced = os.environ.get("RCFAST_USE_CUDA")
    if forced == "0":
        return False
    if forced == "1":
        if not torch_has_cuda or CUDA_HOME is None:
            raise RuntimeError(
                "RCFAST_USE_CUDA=1 but torch was built without CUDA or no CUDA toolkit was found "
                f"(torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r})"
            )
        return True
    return torch_has_cuda and (torch.cuda.is_available() or CUDA_HOME is not None)


def _cuda_sources() -> list[str]:
    """The CUDA kernel's sources (csrc/cuda: raw-pointer kernels and their C
    launchers; the TORCH_LIBRARY_IMPL(rcfast, CUDA) registration beside them)."""
    return sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))


class RcfastBuildExtension(BuildExtension):
    """BuildExtension that first compiles the per-capability kernel objects."""

    def build_extension(self, ext):
        capabilities = getattr(ext, "rcfast_cpu_capabilities", ())
        if capabilities:
            objects = self._compile_cpu_capabilities(ext, capabilities)
            ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
        super().build_extension(ext)

    def _compile_cpu_capabilities(self, ext, capabilities) -> list[str]:
        # The extension's own flags (BuildExtension has added its defines by
        # now) plus the capability's.
        base_flags = list(ext.extra_compile_args["cxx"])

        def compile_one(capability):
            name, source, flags = capability
            defines = [f"-DCPU_CAPABILITY={name}"]
            if name != "DEFAULT":
                defines.append(f"-DCPU_CAPABILITY_{name}")
            output_dir = os.path.join(self.build_temp, "cpu_capability", name.lower())
            return self.compiler.compile(
                [source],
                output_dir=output_dir,
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={"cxx": base_flags + defines + flags, "nvcc": []},
                depends=ext.depends,
            )

        # Each capability writes its own build.ninja (separate output dirs), so
        # they can run side by side; the non-ninja compiler wrapper swaps the
        # compiler executable while it runs, so that path runs them serially.
        workers = 1
        if self.use_ninja:
            workers = max(1, min(len(capabilities), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            per_capability = list(pool.map(compile_one, capabilities))
        return [obj for objects in per_capability for obj in objects]


def cpp_extension_modules():
    """``(ext_modules, cmdclass)`` for ``setup()``: the ``rcfast._C`` extension."""
    sources = list(_MAIN_SOURCES)
    cxx_flags = _cxx_flags()
    nvcc_flags = ["-O0", "-g", "-lineinfo"] if _debug() else ["-O3", "-lineinfo"]
    extension_class = CppExtension
    if want_cuda():
        sources += _cuda_sources()
        extension_class = CUDAExtension

    extension = extension_class(
        name="rcfast._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc")],
        depends=_HEADERS,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
    # Picked up by RcfastBuildExtension.build_extension.
    extension.rcfast_cpu_capabilities = CPU_CAPABILITIES
    return [extension], {"build_ext": RcfastBuildExtension}
