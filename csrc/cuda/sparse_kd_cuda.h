// sparse_kd_cuda.h — the C interface of the CUDA kernel of
// rcfast::sparse_multihead_kd_fwd (the KD loss against a top-k teacher).
//
// Raw device pointers and a cudaStream_t only, no torch headers (like
// kd_loss_cuda.h): sparse_kd_cuda.cu compiles with a plain `nvcc -c`, and the
// torch-facing wrapper sparse_kd_cuda_op.cpp is the one place that knows
// at::Tensor.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kd_loss_cuda.h"  // KDDtype

namespace rcfast {
namespace cuda {

// One forward call: student [rows, num_cols] of `dtype` (heads given by
// head_offsets[0..num_heads], device int64), teacher entries values
// [rows, num_heads, k] of `dtype` (-inf = padding) at indices
// [rows, num_heads, k] (int32 or int64, class within the head). Writes
//   head_loss[row * num_heads + h] = w_h * tau_h^2 * KL_h(row)   (float32)
// and, when grad is not null,
//   grad[row, c] = grad_scale * w_h * tau_h * (softmax_s - scatter(p))   (dtype)
// A non-padding index outside its head is never dereferenced: that (row,
// head) gets a NaN loss and gradient. No host synchronisation.
struct SparseKDCudaArgs {
  KDDtype dtype;
  bool indices_are_int64;
  const void* student;
  const void* values;
  const void* indices;
  void* grad;  // nullptr: no gradient
  float* head_loss;
  const int64_t* head_offsets;
  const float* temperatures;
  const float* weights;
  int64_t rows;
  int64_t num_cols;
  int64_t num_heads;
  int64_t k;
  float grad_scale;
};

// Enqueues the kernel on `stream`; returns the launch's error code.
cudaError_t launch_sparse_kd_forward(const SparseKDCudaArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace rcfast
