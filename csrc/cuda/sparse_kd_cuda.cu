// sparse_kd_cuda.cu — the CUDA kernel of the multi-head KD loss against a
// top-k teacher (rcfast::sparse_multihead_kd_fwd). No torch headers.
//
// One thread block per (row, head):
//   pass 1  threads stride over the head's C student logits and over the k
//           teacher entries, each keeping an online (max, sum-exp) state per
//           side; the states are merged across warps (shuffles) and the block
//           (shared memory). Exps are taken in logit units, 2^((u - max) c)
//           with c = log2(e) / tau: u - max is exact near the max, so huge
//           logits and tiny temperatures keep their accuracy.
//   loss    KL = sum_j p_j (log p_j - log q_j) over the entries (gathering the
//           student at their indices), each log-probability relative to its
//           own max, so nothing large cancels; block-summed, then thread 0
//           applies the -inf/NaN rules of csrc/kd_math.h and writes the loss.
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
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

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

// Online softmax state of raw logits u: max (NaN-propagating) and
// sum = sum 2^((u - kd_exp_base(max)) c).
struct OnlineState {
  float max;
  float sum;
};

__device__ __forceinline__ OnlineState empty_state() { return {kd::kd_neg_inf<float>(), 0.0f}; }

// sum relative to old_max, brought to new_max >= old_max; 0 for an empty
// state, and 0 (even for an infinite sum) when the factor underflows.
__device__ __forceinline__ float rebased_sum(float sum, float old_max, float new_max, float c) {
  if (old_max == new_max) return sum;
  if (old_max == kd::kd_neg_inf<float>() && !kd::kd_isnan(new_max)) return 0.0f;
  const float factor = exp2f((old_max - new_max) * c);
  return factor == 0.0f ? 0.0f : sum * factor;
}

__device__ __forceinline__ void merge(OnlineState& into, const OnlineState& other, float c) {
  const float new_max = kd::kd_nanmax(into.max, other.max);
  into.sum = rebased_sum(into.sum, into.max, new_max, c) + rebased_sum(other.sum, other.max, new_max, c);
  into.max = new_max;
}

__device__ __forceinline__ void add(OnlineState& state, float u, float c) {
  if (u == kd::kd_neg_inf<float>()) return;  // exp 0: nothing to add
  merge(state, OnlineState{u, 1.0f}, c);     // 2^((u - u) c) = 1
}

// Block-wide merge; every thread gets the result. `scratch` holds kWarps states.
__device__ OnlineState block_merge(OnlineState state, float c, OnlineState* scratch) {
  for (int delta = 16; delta > 0; delta >>= 1) {
    const OnlineState other{__shfl_down_sync(0xffffffffu, state.max, delta),
                            __shfl_down_sync(0xffffffffu, state.sum, delta)};
    merge(state, other, c);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = state;
  __syncthreads();
  OnlineState total = scratch[0];
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
  __shared__ OnlineState state_scratch[kWarps];
  __shared__ float sum_scratch[kWarps];

  const int64_t row = blockIdx.x;
  const int64_t head = blockIdx.y;
  const int64_t begin = head_offsets[head];
  const int64_t classes = head_offsets[head + 1] - begin;
  const float tau = temperatures[head];
  const float weight = weights[head];
  const float c = kLog2e / tau;
  const scalar_t* s_head = student + row * num_cols + begin;
  const int64_t entries = (row * num_heads + head) * k;
  const scalar_t* v_row = values + entries;
  const index_t* i_row = indices + entries;
  const float neg_inf = kd::kd_neg_inf<float>();

  // Pass 1: both softmax states, and the count of bad indices.
  OnlineState s_state = empty_state();
  for (int64_t col = threadIdx.x; col < classes; col += kThreads) add(s_state, to_float(s_head[col]), c);
  OnlineState t_state = empty_state();
  float bad = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const float v = to_float(v_row[j]);
    const int64_t index = static_cast<int64_t>(i_row[j]);
    if (v != neg_inf && (index < 0 || index >= classes)) bad += 1.0f;
    add(t_state, v, c);
  }
  s_state = block_merge(s_state, c, state_scratch);
  t_state = block_merge(t_state, c, state_scratch);
  const bool any_bad = block_sum(bad, sum_scratch) > 0.0f;

  // KL over the entries, in log2 units: log2 p = (v - b_t) c - log2 l_t.
  const float base_s = kd::kd_exp_base(s_state.max);
  const float base_t = kd::kd_exp_base(t_state.max);
  const float log2_ls = s_state.sum > 0.0f ? log2f(s_state.sum) : 0.0f;  // no mass: q = 0 below
  const float log2_lt = t_state.sum > 0.0f ? log2f(t_state.sum) : 0.0f;
  const bool student_empty = s_state.max == neg_inf;
  float kl_part = 0.0f;
  for (int64_t j = threadIdx.x; j < k; j += kThreads) {
    const float v = to_float(v_row[j]);
    const int64_t index = static_cast<int64_t>(i_row[j]);
    if (v == neg_inf || index < 0 || index >= classes) continue;
    const float log2_p = (v - base_t) * c - log2_lt;
    const float p = exp2f(log2_p);
    if (p == 0.0f) continue;  // no mass, no term (even against a student -inf)
    const float log2_q = (to_float(s_head[index]) - base_s) * c - log2_ls;
    kl_part += p * (log2_p - log2_q);
  }
  float kl = block_sum(kl_part, sum_scratch) * kLn2;
  if (kd::kd_isnan(s_state.max) || kd::kd_isnan(s_state.sum) || kd::kd_isnan(t_state.max) ||
      kd::kd_isnan(t_state.sum) || any_bad) {
    kl = nanf("");  // NaN in, NaN out; a bad index, NaN too
  } else if (t_state.max == neg_inf) {
    kl = 0.0f;  // padding only: no distribution to match
  } else if (student_empty) {
    kl = INFINITY;
  }
  if (threadIdx.x == 0) head_loss[row * num_heads + head] = weight * tau * tau * kl;
  if (grad == nullptr) return;  // uniform across the block

  // Pass 2: coef * softmax over the head, then the entries.
  const float coef = grad_scale * weight * tau;
  scalar_t* g_head = grad + row * num_cols + begin;
  const bool nan_head = kd::kd_isnan(kl);
  const bool no_teacher = t_state.max == neg_inf;
  for (int64_t col = threadIdx.x; col < classes; col += kThreads) {
    float g = 0.0f;
    if (nan_head) {
      g = nanf("");
    } else if (!no_teacher && !student_empty) {
      g = coef * exp2f((to_float(s_head[col]) - base_s) * c - log2_ls);
    }
    g_head[col] = from_float<scalar_t>(g);
  }
  if (nan_head || no_teacher) return;
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
    const float q = student_empty ? 0.0f : exp2f((to_float(s_head[index]) - base_s) * c - log2_ls);
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
