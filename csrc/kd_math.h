// kd_math.h — the per-(row, head) scalar math of the multi-head softened-KL
// loss, shared by the CPU kernel (csrc/cpu) and, later, the CUDA kernel
// (csrc/cuda). No torch headers: only <cmath>, so nvcc can compile it for the
// device and the CPU build can include it from every per-capability object.
//
// Notation for one row and one head with temperature tau (x = logit / tau):
//   m_s, l_s  running max and rescaled sum of exp(x_s - m_s)   (student)
//   m_t, l_t  the same for the teacher
//   A         sum of exp(x_t - m_t) * (x_t - x_s), rescaled with l_t
// so that, with lse = m + log(l),
//   KL(p_t || p_s) = A / l_t - lse_t + lse_s
// (because sum_j p_t,j = 1). The gradient of the weighted loss with respect to
// the student logit s_j is
//   coef * (exp(x_s,j - lse_s) - exp(x_t,j - lse_t)),  coef = scale * w * tau.
//
// Exact semantics of non-finite inputs (DESIGN.md, "Masked classes"):
//   * teacher -inf: p_t = 0, the class contributes nothing — not even when the
//     student is -inf there too (callers mask the A term where exp(x_t - m_t)
//     is 0, which turns 0 * inf into 0);
//   * student -inf where the teacher has mass: +inf loss (the true value);
//     its gradient stays finite (-coef * p_t);
//   * a head whose teacher is -inf everywhere is fully masked: loss 0 and
//     gradient 0 (there is no distribution to match);
//   * a head whose student is -inf everywhere (teacher not fully masked):
//     +inf loss, gradient -coef * p_t (the student softmax is taken as 0);
//   * NaN anywhere in a head's student or teacher logits: NaN loss and NaN
//     gradient for that head. Callers detect it through a NaN-propagating max,
//     so the result does not depend on how a (fast) exp treats NaN.
//   Nothing else yields NaN (+inf logits are outside the contract: they make
//   the softmax itself undefined).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RCFAST_HOST_DEVICE __host__ __device__
#else
#define RCFAST_HOST_DEVICE
#endif

namespace rcfast {
namespace kd {

// exp/log overloads that exist on the host and on the device under one name
// (std:: overloads are not all usable in device code).
RCFAST_HOST_DEVICE inline float kd_exp(float x) { return expf(x); }
RCFAST_HOST_DEVICE inline double kd_exp(double x) { return exp(x); }
RCFAST_HOST_DEVICE inline float kd_log(float x) { return logf(x); }
RCFAST_HOST_DEVICE inline double kd_log(double x) { return log(x); }

template <typename T>
RCFAST_HOST_DEVICE inline T kd_neg_inf() {
  return static_cast<T>(-INFINITY);
}

template <typename T>
RCFAST_HOST_DEVICE inline bool kd_isnan(T x) {
  return x != x;  // no std::isnan: it is not a device function everywhere
}

// max(a, b) that returns NaN when either argument is NaN (IEEE maximum), so
// that a NaN logit poisons the running max and is never silently skipped.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_nanmax(T a, T b) {
  return (a > b || kd_isnan(a)) ? a : b;
}

// The exponent base used when exponentiating with running max m: a head (or a
// tile) whose values are all -inf has m = -inf, and exp(-inf - (-inf)) would be
// NaN; with base 0 every such exp is exp(-inf) = 0, which is the right value.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_exp_base(T running_max) {
  return running_max == kd_neg_inf<T>() ? T(0) : running_max;
}

// Factor that rescales sums taken relative to old_max so they become relative
// to new_max >= old_max. Sums relative to -inf are 0 (nothing was seen yet), so
// the factor is 0 there; NaN maxima give NaN.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_rescale_factor(T old_max, T new_max) {
  if (old_max == new_max) return T(1);
  if (old_max == kd_neg_inf<T>() && !kd_isnan(new_max)) return T(0);
  return kd_exp(old_max - new_max);
}

// sum * factor, except that a factor of 0 (everything so far is negligible
// next to the new max: exp underflowed) gives 0 even for an infinite sum. An
// A term that is +inf because the student is -inf where the teacher had mass
// must vanish once that mass underflows to p_t = 0, as in the reference.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_rescale_sum(T sum, T factor) {
  return factor == T(0) ? T(0) : sum * factor;
}

// Online (running max, rescaled sum) state of one tensor in one head.
template <typename T>
struct KDSoftmaxState {
  T max;  // running max of x = logit / tau (NaN once a NaN was seen)
  T sum;  // sum of exp(x - kd_exp_base(max))
};

template <typename T>
RCFAST_HOST_DEVICE inline KDSoftmaxState<T> kd_softmax_state_init() {
  return {kd_neg_inf<T>(), T(0)};
}

// Merge a block whose max is block_max into the running state and return the
// factor by which sums relative to the old max must be multiplied (the caller
// applies it to every sum that shares this max, e.g. the A term of the
// teacher). After the call, exponentiate the block relative to
// kd_exp_base(state.max) and add its sum to state.sum.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_merge_block_max(KDSoftmaxState<T>& state, T block_max) {
  const T new_max = kd_nanmax(state.max, block_max);
  const T factor = kd_rescale_factor(state.max, new_max);
  state.max = new_max;
  state.sum = kd_rescale_sum(state.sum, factor);
  return factor;
}

// Merge two partial states (e.g. two threads' or two warps' halves of a head).
// a_extra / b_extra are sums sharing the state's max (the teacher's A term);
// pass 0 where there is none.
template <typename T>
RCFAST_HOST_DEVICE inline void kd_merge_states(KDSoftmaxState<T>& a, T& a_extra,
                                               const KDSoftmaxState<T>& b, T b_extra) {
  const T new_max = kd_nanmax(a.max, b.max);
  const T fa = kd_rescale_factor(a.max, new_max);
  const T fb = kd_rescale_factor(b.max, new_max);
  a.sum = kd_rescale_sum(a.sum, fa) + kd_rescale_sum(b.sum, fb);
  a_extra = kd_rescale_sum(a_extra, fa) + kd_rescale_sum(b_extra, fb);
  a.max = new_max;
}

// log-sum-exp of x from the state: max + log(sum); -inf for an all -inf head.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_lse(const KDSoftmaxState<T>& state) {
  if (state.max == kd_neg_inf<T>()) return kd_neg_inf<T>();
  return state.max + kd_log(state.sum);
}

// One element's contribution to A: exp(x_t - m_t) * (x_t - x_s), masked to 0
// where the teacher's exp is 0 (p_t = 0 adds nothing, even if the student is
// -inf there too and the product would be 0 * inf = NaN).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_a_term(T exp_teacher, T x_teacher, T x_student) {
  return exp_teacher > T(0) ? exp_teacher * (x_teacher - x_student) : T(0);
}

// KL(p_t || p_s) of one head from the final states; see the semantics above.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_finalize_kl(const KDSoftmaxState<T>& student,
                                           const KDSoftmaxState<T>& teacher, T a_term) {
  if (kd_isnan(student.max) || kd_isnan(teacher.max) || kd_isnan(a_term) ||
      kd_isnan(student.sum) || kd_isnan(teacher.sum)) {
    return T(NAN);
  }
  if (teacher.max == kd_neg_inf<T>()) return T(0);         // fully masked head
  if (student.max == kd_neg_inf<T>()) return T(INFINITY);  // student has no mass
  // a_term may be +inf (student -inf where the teacher has mass): stays +inf.
  return a_term / teacher.sum - kd_lse(teacher) + kd_lse(student);
}

// Multiplier turning exp(x - kd_exp_base(block_max)) (computed while the
// running max was block_max) into coef * softmax(x) with the final state:
// coef * exp(block_max - final_max) / final_sum. 0 where nothing has mass
// (all -inf so far, or a student head with no mass at all).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_grad_factor(T coef, T block_max, const KDSoftmaxState<T>& final_state) {
  if (final_state.max == kd_neg_inf<T>() || block_max == kd_neg_inf<T>()) return T(0);
  if (block_max == final_state.max) return coef / final_state.sum;  // exp(0): skip the call
  return coef * kd_exp(block_max - final_state.max) / final_state.sum;
}

// One gradient element, coef * (softmax_s - softmax_t), with lse's of x. For
// kernels that recompute exps in pass 2 one element at a time (the CUDA one);
// the CPU kernel uses the factored form exp(x - m) * kd_grad_factor(...).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_grad_element(T coef, T x_student, T lse_student, T x_teacher,
                                            T lse_teacher) {
  const T p_s = lse_student == kd_neg_inf<T>() ? T(0) : kd_exp(x_student - lse_student);
  const T p_t = kd_exp(x_teacher - lse_teacher);
  return coef * (p_s - p_t);
}

// The reduction's scale (rcfast/ops/kernel_contract.py: none 0, sum 1, mean 2,
// batchmean 3), which the kernels fold into the gradient: 1 for none and sum,
// 1/B for batchmean, 1/(B*H) for mean.
inline double kd_reduction_scale(long long reduction, long long batch, long long num_heads) {
  if (reduction == 3) return 1.0 / static_cast<double>(batch);
  if (reduction == 2) return 1.0 / (static_cast<double>(batch) * static_cast<double>(num_heads));
  return 1.0;
}

}  // namespace kd
}  // namespace rcfast
