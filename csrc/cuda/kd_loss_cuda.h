// kd_loss_cuda.h — the C interface of the CUDA kernel of rcfast::multihead_kd_fwd.
//
// Raw device pointers and a cudaStream_t only, no torch headers: the kernel
// file (kd_loss_cuda.cu) compiles with a plain `nvcc -c` on any machine with a
// toolkit (CI does it without a GPU), and the torch-facing wrapper
// (kd_cuda_op.cpp, built only when torch has CUDA) is the one place that knows
// about at::Tensor.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace rcfast {
namespace cuda {

enum class KDDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One forward call over packed logits [rows, num_cols] of `dtype`, heads given
// by head_offsets[0..num_heads] (device, int64). Writes
//   head_loss[row * num_heads + h] = w_h * tau_h^2 * KL_h(row)          (float32)
// and, when grad is not null,
//   grad[row, c] = grad_scale * w_h * tau_h * (softmax_s - softmax_t)   (dtype)
// Semantics of -inf/NaN: csrc/kd_math.h. No host synchronisation.
struct KDCudaArgs {
  KDDtype dtype;
  const void* student;
  const void* teacher;
  void* grad;          // nullptr: pass 2 is skipped
  float* head_loss;    // [rows, num_heads]
  const int64_t* head_offsets;
  const float* temperatures;
  const float* weights;
  int64_t rows;
  int64_t num_cols;
  int64_t num_heads;
  float grad_scale;
};

// Enqueues the kernel on `stream`; returns the launch's error code.
cudaError_t launch_multihead_kd_forward(const KDCudaArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace rcfast
