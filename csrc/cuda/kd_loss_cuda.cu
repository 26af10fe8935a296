// kd_loss_cuda.cu — the CUDA kernel of the fused multi-head softened-KL loss.
//
// DESIGN.md's algorithm, one thread block per (row, head):
//   pass 1  every thread walks the head's classes with a block-stride loop
//           (coalesced loads) keeping an online (max, sum-exp) state for s/tau
//           and t/tau and the teacher-weighted A term; the states are merged
//           across the warp with shuffles, then across warps through shared
//           memory; thread 0 writes the head's loss.
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

using kd::KDSoftmaxState;

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

// The per-thread (and, after merging, per-block) partial result of pass 1.
struct PartialKD {
  KDSoftmaxState<float> student;
  KDSoftmaxState<float> teacher;
  float a_term;  // shares the teacher's max
};

__device__ __forceinline__ void merge_into(PartialKD& into, const PartialKD& other) {
  float no_extra = 0.0f;
  kd::kd_merge_states(into.student, no_extra, other.student, 0.0f);
  kd::kd_merge_states(into.teacher, into.a_term, other.teacher, other.a_term);
}

__device__ __forceinline__ PartialKD shuffle_down(const PartialKD& p, int delta) {
  PartialKD q;
  q.student.max = __shfl_down_sync(0xffffffffu, p.student.max, delta);
  q.student.sum = __shfl_down_sync(0xffffffffu, p.student.sum, delta);
  q.teacher.max = __shfl_down_sync(0xffffffffu, p.teacher.max, delta);
  q.teacher.sum = __shfl_down_sync(0xffffffffu, p.teacher.sum, delta);
  q.a_term = __shfl_down_sync(0xffffffffu, p.a_term, delta);
  return q;
}

__device__ __forceinline__ void warp_merge(PartialKD& p) {
  for (int delta = 16; delta > 0; delta >>= 1) merge_into(p, shuffle_down(p, delta));
}

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
  const float inv_tau = 1.0f / tau;
  const float weight = weights[head];
  const scalar_t* s_row = student + row * num_cols;
  const scalar_t* t_row = teacher + row * num_cols;

  // Pass 1: online softmax states, one element at a time per thread.
  PartialKD part{kd::kd_softmax_state_init<float>(), kd::kd_softmax_state_init<float>(), 0.0f};
  for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
    const float xs = to_float(s_row[c]) * inv_tau;
    const float xt = to_float(t_row[c]) * inv_tau;
    kd::kd_merge_block_max(part.student, xs);
    part.student.sum += kd::kd_exp(xs - kd::kd_exp_base(part.student.max));
    const float factor = kd::kd_merge_block_max(part.teacher, xt);
    part.a_term = kd::kd_rescale_sum(part.a_term, factor);
    const float et = kd::kd_exp(xt - kd::kd_exp_base(part.teacher.max));
    part.teacher.sum += et;
    part.a_term += kd::kd_a_term(et, xt, xs);
  }

  // Merge: warp shuffles, then warp leaders through shared memory.
  __shared__ PartialKD warp_parts[kWarps];
  __shared__ float shared_lse[2];
  __shared__ bool shared_teacher_masked;
  warp_merge(part);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_parts[warp] = part;
  __syncthreads();
  if (warp == 0) {
    part = lane < kWarps ? warp_parts[lane]
                         : PartialKD{kd::kd_softmax_state_init<float>(), kd::kd_softmax_state_init<float>(), 0.0f};
    warp_merge(part);
    if (lane == 0) {
      const float kl = kd::kd_finalize_kl(part.student, part.teacher, part.a_term);
      head_loss[row * num_heads + head] = weight * tau * tau * kl;
      shared_lse[0] = kd::kd_lse(part.student);
      shared_lse[1] = kd::kd_lse(part.teacher);
      shared_teacher_masked = part.teacher.max == kd::kd_neg_inf<float>();
    }
  }
  if (grad == nullptr) return;  // uniform across the block: no thread waits below
  __syncthreads();

  // Pass 2: the gradient. A fully masked teacher head has no distribution to
  // match: its gradient is 0 (kd_math.h).
  const float lse_s = shared_lse[0];
  const float lse_t = shared_lse[1];
  const bool teacher_masked = shared_teacher_masked;
  const float coef = grad_scale * weight * tau;
  scalar_t* g_row = grad + row * num_cols;
  for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) {
    float g = 0.0f;
    if (!teacher_masked) {
      const float xs = to_float(s_row[c]) * inv_tau;
      const float xt = to_float(t_row[c]) * inv_tau;
      g = kd::kd_grad_element(coef, xs, lse_s, xt, lse_t);
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
