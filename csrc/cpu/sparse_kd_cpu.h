// sparse_kd_cpu.h — the interface between the CPU op of the sparse (top-k
// teacher) loss (sparse_kd_cpu.cpp: checks, outputs, reduction, runtime
// choice of the vector path) and its kernel body (sparse_kd_cpu_kernel_impl.h),
// which is compiled once per CPU capability (DEFAULT, AVX2, AVX512) like the
// dense kernel (kd_cpu.h), each copy in namespace rcfast::cpu::<CAPABILITY>.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace rcfast {
namespace cpu {

// Everything one kernel call needs, validated and allocated by the caller:
// student is contiguous [B, N] (float, double, bfloat16, half); values are
// contiguous [B, H, k] of the student's dtype (-inf = padding); indices are
// contiguous [B, H, k] int32 or int64 (class within the head); grad is
// [B, N] of the student's dtype when compute_grad; task_losses is [B, H]
// double, w_h tau_h^2 KL per (row, head) (kd_head_loss).
// head_offsets/temperatures/weights point at H + 1 / H / H values.
struct SparseKDCpuArgs {
  at::Tensor student;
  at::Tensor values;
  at::Tensor indices;
  const int64_t* head_offsets;
  const float* temperatures;
  const float* weights;
  int64_t num_heads;
  double grad_scale;  // the reduction's scale folded into the gradient (1 for none)
  bool compute_grad;
  at::Tensor task_losses;  // output
  at::Tensor grad;         // output (written only when compute_grad)
};

// Throws a c10::ValueError (Python ValueError) naming teacher_indices when a
// non-padding entry's index is outside its head.
namespace DEFAULT {
void sparse_multihead_kd_cpu_kernel(const SparseKDCpuArgs& args);
}
namespace AVX2 {
void sparse_multihead_kd_cpu_kernel(const SparseKDCpuArgs& args);
}
namespace AVX512 {
void sparse_multihead_kd_cpu_kernel(const SparseKDCpuArgs& args);
}

}  // namespace cpu
}  // namespace rcfast
