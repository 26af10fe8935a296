// kd_loss_cuda.cu — the CUDA kernel of the fused multi-head softened-KL loss.
//
// DESIGN.md's algorithm, one thread block per (row, head):
//   pass 1  every thread walks the head's classes with a block-stride loop
//           (coalesced loads) keeping an online state (kd_math.h: running
//           max and sum of exps of student and teacher, and the
//           teacher-weighted gap A); the states are merged across the warp
//           with shuffles, then across warps through shared memory; thread 0
//           writes the head's loss.
//   pass 2  (only when a gradient buffer is given) the same loop writes
//           grad_scale * w * tau * (softmax(s/tau) - softmax(t/tau)).
// The row/head math is csrc/kd_math.h, shared with the CPU kernel, so both
// backends have the same -inf/NaN semantics. No torch headers here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kd_math.h"
#include "kd_loss_cuda.h"

namespace rcfast {
namespace cuda {
namespace {

using kd::KDHeadState;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ KDHeadState<float> shuffle_down(const KDHeadState<float>& p, int delta) {
  KDHeadState<float> q;
  q.student.max = __shfl_down_sync(0xffffffffu, p.student.max, delta);
  q.student.sum = __shfl_down_sync(0xffffffffu, p.student.sum, delta);
  q.teacher.max = __shfl_down_sync(0xffffffffu, p.teacher.max, delta);
  q.teacher.sum = __shfl_down_sync(0xffffffffu, p.teacher.sum, delta);
  q.a_term = __shfl_down_sync(0xffffffffu, p.a_term, delta);
  q.student_inf = __shfl_down_sync(0xffffffffu, p.student_inf, delta);
  return q;
}

__device__ __forceinline__ void warp_merge(KDHeadState<float>& p, float exp_scale) {
  for (int delta = 16; delta > 0; delta >>= 1) kd::kd_merge(p, shuffle_down(p, delta), exp_scale);
}

// What pass 2 needs of a head, from thread 0 of the block.
struct HeadSummary {
  float base_student, log2_sum_student, base_teacher, log2_sum_teacher;
  bool student_empty;
  bool zero_gradient;  // fully masked teacher or weight 0
  bool nan_gradient;   // NaN in, NaN out
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    multihead_kd_forward_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                                scalar_t* __restrict__ grad, float* __restrict__ head_loss,
                                const int64_t* __restrict__ head_offsets, const float* __restrict__ temperatures,
                                const float* __restrict__ weights, int64_t num_cols, int64_t num_heads,
                                float grad_scale) {
  const int64_t row = blockIdx.x;
  const int64_t head = blockIdx.y;
  const int64_t begin = head_offsets[head];
  const int64_t end = head_offsets[head + 1];
  const float tau = temperatures[head];
  const float weight = weights[head];
  // Exps in base 2, logits in their own units (kd_math.h).
  const float exp_scale = static_cast<float>(kd::kLog2e / static_cast<double>(tau));
  const scalar_t* s_row = student + row * num_cols;
  const scalar_t* t_row = teacher + row * num_cols;

  // Pass 1: online states, one element at a time per thread.
  KDHeadState<float> part = kd::kd_head_state_init<float>();
  for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
    const float us = to_float(s_row[c]);
    const float ut = to_float(t_row[c]);
    kd::kd_rebase(part, us, ut, exp_scale);
    kd::kd_accumulate(part, us, ut, exp_scale);
  }

  // Merge: warp shuffles, then warp leaders through shared memory.
  __shared__ KDHeadState<float> warp_parts[kWarps];
  __shared__ HeadSummary summary;
  warp_merge(part, exp_scale);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_parts[warp] = part;
  __syncthreads();
  if (warp == 0) {
    part = lane < kWarps ? warp_parts[lane] : kd::kd_head_state_init<float>();
    warp_merge(part, exp_scale);
    if (lane == 0) {
      const double loss = kd::kd_head_loss(part, static_cast<double>(tau), static_cast<double>(weight));
      head_loss[row * num_heads + head] = static_cast<float>(loss);
      summary.base_student = kd::kd_exp_base(part.student.max);
      summary.log2_sum_student = kd::kd_log2_sum(part.student);
      summary.base_teacher = kd::kd_exp_base(part.teacher.max);
      summary.log2_sum_teacher = kd::kd_log2_sum(part.teacher);
      summary.student_empty = part.student.max == kd::kd_neg_inf<float>();  // its softmax is taken as 0
      summary.nan_gradient = kd::kd_isnan(loss);
      summary.zero_gradient = part.teacher.max == kd::kd_neg_inf<float>() || weight == 0.0f;
    }
  }
  if (grad == nullptr) return;  // uniform across the block: no thread waits below
  __syncthreads();

  // Pass 2: the gradient (kd_math.h).
  const HeadSummary head_summary = summary;
  const float coef = grad_scale * weight * tau;
  scalar_t* g_row = grad + row * num_cols;
  for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
    float g = 0.0f;
    if (head_summary.nan_gradient) {
      g = NAN;
    } else if (!head_summary.zero_gradient) {
      g = kd::kd_grad_element(coef, exp_scale, to_float(s_row[c]), head_summary.base_student,
                              head_summary.log2_sum_student, head_summary.student_empty, to_float(t_row[c]),
                              head_summary.base_teacher, head_summary.log2_sum_teacher);
    }
    g_row[c] = from_float<scalar_t>(g);
  }
}

template <typename scalar_t>
cudaError_t launch_typed(const KDCudaArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.num_heads == 0) return cudaSuccess;
  if (args.num_heads > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y limit
  const dim3 grid(static_cast<unsigned int>(args.rows), static_cast<unsigned int>(args.num_heads));
  multihead_kd_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(args.student), static_cast<const scalar_t*>(args.teacher),
      static_cast<scalar_t*>(args.grad), args.head_loss, args.head_offsets, args.temperatures, args.weights,
      args.num_cols, args.num_heads, args.grad_scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_multihead_kd_forward(const KDCudaArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case KDDtype::kFloat32:
      return launch_typed<float>(args, stream);
    case KDDtype::kFloat16:
      return launch_typed<__half>(args, stream);
    case KDDtype::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace rcfast
