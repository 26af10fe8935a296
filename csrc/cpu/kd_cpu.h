// kd_cpu.h — the interface between the CPU op (kd_cpu.cpp: checks, outputs,
// runtime choice of the vector path) and the kernel body
// (kd_cpu_driver.h), which build_ext.py compiles once per CPU capability
// (DEFAULT, AVX2, AVX512) with that capability's flags, each copy in its own
// namespace rcfast::cpu::<CAPABILITY> — the way ATen's DispatchStub kernels
// are built. Nothing here depends on a capability, so every object can include
// it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "../kd_math.h"

namespace rcfast {
namespace cpu {

// Everything one kernel call needs. Tensors are validated and allocated by the
// caller: student/teacher are contiguous [B, N] of one dtype (float, double,
// bfloat16, half); grad is [B, N] of that dtype when compute_grad, else
// unused; loss is [B] (reduction "none") or a scalar, float (double for double
// inputs). head_offsets/temperatures/weights point at H + 1 / H / H values.
struct KDCpuArgs {
  at::Tensor student;
  at::Tensor teacher;
  const int64_t* head_offsets;
  const float* temperatures;
  const float* weights;
  int64_t num_heads;
  kd::KDReduction reduction;  // also gives the scale folded into the gradient
  bool compute_grad;
  at::Tensor loss;     // output
  at::Tensor grad;     // output (written only when compute_grad)
};

// One definition per capability object (see build_ext.py). The DEFAULT one is
// always built; AVX2/AVX512 only on x86-64, which build_ext.py announces to
// kd_cpu.cpp with RCFAST_HAVE_CPU_AVX2 / RCFAST_HAVE_CPU_AVX512.
namespace DEFAULT {
void multihead_kd_cpu_kernel(const KDCpuArgs& args);
}
namespace AVX2 {
void multihead_kd_cpu_kernel(const KDCpuArgs& args);
}
namespace AVX512 {
void multihead_kd_cpu_kernel(const KDCpuArgs& args);
}

}  // namespace cpu
}  // namespace rcfast
