// sparse_kd_cuda.cu — the CUDA kernel of the multi-head KD loss against a
// top-k teacher (rcfast::sparse_multihead_kd_fwd). No torch headers.
//
// One thread block per (row, head), on kd_math.h's math and units (logits,
// exps 2^((u - max) c) with c = log2(e) / tau):
//   pass 1  threads stride over the head's C student logits and over the k
//           teacher entries, each keeping an online softmax state per side;
//           the states are merged across warps (shuffles) and the block
//           (shared memory).
//   loss    A = sum_j e_j ((v_j - b_t) - (s_j - b_s)) over the entries
//           (gathering the student at their indices), relative to the final
//           maxima, and the +inf flag (a student -inf at a finite value),
//           block-summed into the head's KDHeadState; kd_head_loss applies
//           every -inf/NaN/weight-0 rule, as in the dense kernels.
//   grad    (when a buffer is given) coef * softmax(s/tau) over the head, a
//           barrier, then at the entries coef * (q - P), P the mass of the
//           entries sharing the index (repeated indices, which only
//           validate=True rejects, still give the gradient of the loss; the
//           repeated lanes store the same value).
// A non-padding index outside [0, C) is never dereferenced: the (row, head)
// becomes NaN (the kernel cannot raise without a host synchronisation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../kd_math.h"
#include "sparse_kd_cuda.h"

namespace rcfast {
namespace cuda {
namespace {

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

using kd::KDHeadState;
using kd::KDSoftmaxState;

// Brings `into` to the max of both and adds `other`'s sum (kd_math.h's rescaling).
__device__ __forceinline__ void merge(KDSoftmaxState<float>& into, const KDSoftmaxState<float>& other, float c) {
  const float new_max = kd::kd_nanmax(into.max, other.max);
  into.sum = kd::kd_rescale_sum(into.sum, kd::kd_rescale_factor(into.max, new_max, c)) +
             kd::kd_rescale_sum(other.sum, kd::kd_rescale_factor(other.max, new_max, c));
  into.max = new_max;
}

// Adds one logit: 2^((u - base) c) with the moved base. A +inf logit gives
// 2^(inf - inf) = NaN, a NaN logit NaN: both reach kd_head_loss as NaN.
__device__ __forceinline__ void add(KDSoftmaxState<float>& state, float u, float c) {
  const float new_max = kd::kd_nanmax(state.max, u);
  state.sum = kd::kd_rescale_sum(state.sum, kd::kd_rescale_factor(state.max, new_max, c));
  state.max = new_max;
  state.sum += exp2f((u - kd::kd_exp_base(new_max)) * c);
}

// Block-wide merge; every thread gets the result. `scratch` holds kWarps states.
__device__ KDSoftmaxState<float> block_merge(KDSoftmaxState<float> state, float c, KDSoftmaxState<float>* scratch) {
  for (int delta = 16; delta > 0; delta >>= 1) {
    const KDSoftmaxState<float> other{__shfl_down_sync(0xffffffffu, state.max, delta),
                            __shfl_down_sync(0xffffffffu, state.sum, delta)};
    merge(state, other, c);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  KDSoftmaxState<float> total = scratch[0];
  for (int w = 1; w < kWarps; ++w) merge(total, scratch[w], c);
  return total;
}

// Block-wide sum; every thread gets the result. `scratch` holds kWarps floats.
__device__ float block_sum(float value, float* scratch) {
  for (int delta = 16; delta > 0; delta >>= 1) value += __shfl_down_sync(0xffffffffu, value, delta);
  __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    sparse_kd_forward_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ values,
                             const index_t* __restrict__ indices, scalar_t* __restrict__ grad,
                             float* __restrict__ head_loss, const int64_t* __restrict__ head_offsets,
                             const float* __restrict__ temperatures, const float* __restrict__ weights,
                             int64_t num_cols, int64_t num_heads, int64_t k, float grad_scale) {
  __shared__ KDSoftmaxState<float> state_scratch[kWarps];
  __shared__ float sum_scratch[kWarps];

  const int64_t row = blockIdx.x;
  const int64_t head = blockIdx.y;
  const int64_t begin = head_offsets[head];
  const int64_t classes = head_offsets[head + 1] - begin;
  const float tau = temperatures[head];
  const float weight = weights[head];
  const float c = static_cast<float>(kd::kLog2e) / tau;
  const scalar_t* s_head = student + row * num_cols + begin;
  const int64_t entries = (row * num_heads + head) * k;
  const scalar_t* v_row = values + entries;
  const index_t* i_row = indices + entries;
  const float neg_inf = kd::kd_neg_inf<float>();

  // Pass 1: both softmax states, and the count of bad indices.
  KDHeadState<float> state = kd::kd_head_state_init<float>();
  for (int64_t col = threadIdx.x; col < classes; col += kThreads) add(state.student, to_float(s_head[col]), c);
  float bad = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const float v = to_float(v_row[j]);
    const int64_t index = static_cast<int64_t>(i_row[j]);
    if (v != neg_inf && (index < 0 || index >= classes)) bad += 1.0f;
    add(state.teacher, v, c);
  }
  state.student = block_merge(state.student, c, state_scratch);
  state.teacher = block_merge(state.teacher, c, state_scratch);
  const bool any_bad = block_sum(bad, sum_scratch) > 0.0f;

  // A (kd_math.h) over the entries, relative to the final maxima, and whether a
  // student -inf meets a finite value (the KL is +inf).
  const float base_s = kd::kd_exp_base(state.student.max);
  const float base_t = kd::kd_exp_base(state.teacher.max);
  float a_part = 0.0f, inf_part = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const float v = to_float(v_row[j]);
    const int64_t index = static_cast<int64_t>(i_row[j]);
    if (v == neg_inf || index < 0 || index >= classes) continue;
    const float u = to_float(s_head[index]);
    const float v_t = v - base_t;
    a_part += kd::kd_a_term(exp2f(v_t * c), v_t - (u - base_s));
    if (kd::kd_student_inf(u, v)) inf_part = 1.0f;
  }
  state.a_term = block_sum(a_part, sum_scratch);
  state.student_inf = block_sum(inf_part, sum_scratch) > 0.0f ? 1.0f : 0.0f;
  const double loss = any_bad ? static_cast<double>(nanf("")) : kd::kd_head_loss(state, tau, weight);
  if (threadIdx.x == 0) head_loss[row * num_heads + head] = static_cast<float>(loss);
  if (grad == nullptr) return;  // uniform across the block

  // Pass 2: coef * softmax over the head, then the entries. NaN in, NaN out; no
  // gradient for padding only or weight 0.
  scalar_t* g_head = grad + row * num_cols + begin;
  const bool nan_head = kd::kd_isnan(loss);
  if (nan_head || state.teacher.max == neg_inf || weight == 0.0f) {
    const float fill = nan_head ? nanf("") : 0.0f;
    for (int64_t col = threadIdx.x; col < classes; col += kThreads) g_head[col] = from_float<scalar_t>(fill);
    return;
  }
  const float coef = grad_scale * weight * tau;
  const float log2_ls = kd::kd_log2_sum(state.student);  // a student with no mass: q = 0
  const float log2_lt = kd::kd_log2_sum(state.teacher);
  for (int64_t col = threadIdx.x; col < classes; col += kThreads) {
    g_head[col] = from_float<scalar_t>(coef * exp2f((to_float(s_head[col]) - base_s) * c - log2_ls));
  }
  __syncthreads();  // the entries' addresses were written by other threads
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const float v = to_float(v_row[j]);
    const index_t index = i_row[j];
    if (v == neg_inf) continue;
    float mass = 0.0f;  // the teacher mass of every entry naming this class
    for (int64_t i = 0; i < k; ++i) {
      const float v_i = to_float(v_row[i]);
      if (i_row[i] == index && v_i != neg_inf) mass += exp2f((v_i - base_t) * c - log2_lt);
    }
    const float q = exp2f((to_float(s_head[index]) - base_s) * c - log2_ls);
    g_head[index] = from_float<scalar_t>(coef * (q - mass));
  }
}

template <typename scalar_t, typename index_t>
cudaError_t launch_typed(const SparseKDCudaArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.num_heads == 0) return cudaSuccess;
  if (args.num_heads > 65535 || args.rows > 2147483647) return cudaErrorInvalidConfiguration;  // grid limits
  const dim3 grid(static_cast<unsigned int>(args.rows), static_cast<unsigned int>(args.num_heads));
  sparse_kd_forward_kernel<scalar_t, index_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(args.student), static_cast<const scalar_t*>(args.values),
      static_cast<const index_t*>(args.indices), static_cast<scalar_t*>(args.grad), args.head_loss,
      args.head_offsets, args.temperatures, args.weights, args.num_cols, args.num_heads, args.k, args.grad_scale);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_for_dtype(const SparseKDCudaArgs& args, cudaStream_t stream) {
  return args.indices_are_int64 ? launch_typed<scalar_t, int64_t>(args, stream)
                                : launch_typed<scalar_t, int32_t>(args, stream);
}

}  // namespace

cudaError_t launch_sparse_kd_forward(const SparseKDCudaArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case KDDtype::kFloat32:
      return launch_for_dtype<float>(args, stream);
    case KDDtype::kFloat16:
      return launch_for_dtype<__half>(args, stream);
    case KDDtype::kBFloat16:
      return launch_for_dtype<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace rcfast
