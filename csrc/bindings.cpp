// bindings.cpp — the Python module rcfast._C and the schemas of the rcfast::
// ops (pytorch/extension-cpp style).
//
// `from rcfast import _C` loads this shared library; that runs the static
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations below and beside each
// kernel (csrc/cpu/kd_cpu.cpp for the CPU, csrc/cuda when built with CUDA).
// The module itself is empty: the ops are reached as torch.ops.rcfast.*, and
// rcfast/ops/cpu_backend.py adds their fake implementation and autograd
// formula in Python.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing it is what matters (the static registrations).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "rcfast's C++ ops, registered as torch.ops.rcfast.* on import",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(rcfast, m) {
  // Exactly rcfast.ops.kernel_contract.OP_SCHEMA (tests/test_cpu_kernel.py checks it).
  m.def(
      "multihead_kd_fwd(Tensor student, Tensor teacher, Tensor head_offsets, Tensor temperatures, "
      "Tensor weights, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  // The loss against a top-k teacher: exactly rcfast.ops.sparse_contract.SPARSE_OP_SCHEMA
  // (tests/test_sparse_kd.py checks it).
  m.def(
      "sparse_multihead_kd_fwd(Tensor student, Tensor teacher_values, Tensor teacher_indices, "
      "Tensor head_offsets, Tensor temperatures, Tensor weights, int reduction, bool compute_grad) "
      "-> (Tensor, Tensor)");
  // Which vector path the CPU kernel runs here: "avx512", "avx2" or "default".
  m.def("kd_cpu_capability() -> str");
}
