// kd_math.h — the per-(row, head) math of the multi-head softened-KL loss,
// shared by the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda). No
// torch headers, only <cmath>, so nvcc compiles it for the device and every
// per-capability CPU object includes it.
//
// Units. Everything is kept in *logit* units: with u a logit, tau the
// temperature and c = log2(e) / tau, exps are 2^((u - b) c) for a base b (a
// running max of u). u / tau is never formed, so no finite logit overflows
// however small tau is, and a large logit does not spoil the exponent's
// accuracy (u - b is exact near the max; the old form u/tau - max/tau lost
// ulp(max/tau)).
//
// Per head and tensor, a running state: max M of u (NaN-propagating) and
// l = sum 2^((u - b) c) with b = kd_exp_base(M). For the teacher also
//   A = sum e_t ((u_t - b_t) - (u_s - b_s)) * kATermScale,  e_t = 2^((u_t - b_t) c),
// the teacher-weighted gap of the two log-probabilities' numerators relative
// to the current bases (masked to 0 where e_t = 0). Relative to the bases, A
// stays of the order of the KL itself: a large logit does not make it a
// difference of two huge numbers. When a base moves, every bracket of A moves
// by the same amount, so A is corrected exactly (kd_rebase). Then, with the
// final states (log p = (u - b)/tau - ln l):
//   KL(p_t || p_s) = (1/tau) (A / kATermScale) / l_t + ln(l_s / l_t)
//   loss_h = w tau^2 KL = w tau ((A / kATermScale) / l_t + tau ln(l_s / l_t))
// computed in double (kd_head_loss): no overflow of tau * gap before the
// product with w tau, no underflow of tau^2.
// The gradient with respect to the student logit u_s is
//   coef * (p_s - p_t),  p = 2^((u - b) c - log2 l),  coef = scale * w * tau.
//
// Exact semantics of non-finite inputs (DESIGN.md, "Masked classes"):
//   * teacher -inf: p_t = 0, the class contributes nothing — not even when the
//     student is -inf there too (the A term is masked where e_t is 0);
//   * student -inf where the teacher logit is finite: +inf loss (the true
//     value: p_t > 0 however small). Decided on the logits themselves, not on
//     whether a float32 exp of the teacher underflowed, so every backend
//     agrees (KDHeadState::student_inf); the gradient stays finite
//     (-coef * p_t there);
//   * a head whose teacher is -inf everywhere is fully masked: loss 0 and
//     gradient 0 (there is no distribution to match);
//   * a head whose student is -inf everywhere (teacher not fully masked):
//     +inf loss, gradient -coef * p_t (the student softmax is taken as 0);
//   * NaN anywhere in a head's student or teacher logits, or +inf (the softmax
//     is undefined: inf - inf): NaN loss and NaN gradient for that head.
//     Callers detect NaN through a NaN-propagating max and NaN sums, so the
//     result does not depend on how a (fast) exp treats NaN;
//   * a head of weight 0 adds exactly 0 (also where its KL is +inf), unless
//     it has a NaN;
//   * a 1-class head has p_s = p_t = 1: loss and gradient exactly 0 (exp2(0)
//     is exactly 1 relative to the max; callers use the max-relative form).
//   Nothing else yields NaN.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RCFAST_HOST_DEVICE __host__ __device__
#else
#define RCFAST_HOST_DEVICE
#endif

namespace rcfast {
namespace kd {

// The reduction codes of the ops' `int reduction` argument (Python:
// rcfast.ops.kernel_contract.REDUCTION_CODES, the one mapping on that side).
enum class KDReduction : int64_t { kNone = 0, kSum = 1, kMean = 2, kBatchMean = 3 };

inline bool kd_is_reduction(int64_t code) { return code >= 0 && code <= 3; }

// d(reduced loss) / d(row loss): the one C++ home of this fact, used for the
// gradient the kernels write and for the reduced loss.
inline double kd_reduction_scale(KDReduction reduction, int64_t batch, int64_t num_heads) {
  switch (reduction) {
    case KDReduction::kBatchMean:
      return 1.0 / static_cast<double>(batch);
    case KDReduction::kMean:
      return 1.0 / (static_cast<double>(batch) * static_cast<double>(num_heads));
    case KDReduction::kNone:
    case KDReduction::kSum:
      break;
  }
  return 1.0;
}

// A is accumulated times this power of two: a bracket (u_t - b_t) - (u_s - b_s)
// can be as large as twice the largest float, and A sums C of them.
constexpr double kATermScale = 2.3283064365386963e-10;  // 2^-32
constexpr double kLog2e = 1.4426950408889634;

// exp/log overloads that exist on the host and on the device under one name
// (std:: overloads are not all usable in device code).
RCFAST_HOST_DEVICE inline float kd_exp2(float x) { return exp2f(x); }
RCFAST_HOST_DEVICE inline double kd_exp2(double x) { return exp2(x); }
RCFAST_HOST_DEVICE inline float kd_log2(float x) { return log2f(x); }
RCFAST_HOST_DEVICE inline double kd_log2(double x) { return log2(x); }

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

// The base exps are taken relative to, for a running max m: a head (or a tile)
// whose values are all -inf has m = -inf, and 2^(-inf - (-inf)) would be NaN;
// with base 0 every such exp is 2^-inf = 0, which is the right value.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_exp_base(T running_max) {
  return running_max == kd_neg_inf<T>() ? T(0) : running_max;
}

// Factor that rescales sums taken relative to old_max so they become relative
// to new_max >= old_max. Sums relative to -inf are 0 (nothing was seen yet), so
// the factor is 0 there; NaN maxima give NaN.
template <typename T>
RCFAST_HOST_DEVICE inline T kd_rescale_factor(T old_max, T new_max, T exp_scale) {
  if (old_max == new_max) return T(1);
  if (old_max == kd_neg_inf<T>() && !kd_isnan(new_max)) return T(0);
  return kd_exp2((old_max - new_max) * exp_scale);
}

// sum * factor, except that a factor of 0 (everything so far is negligible
// next to the new max: exp underflowed) gives 0 even for an infinite sum
// (0 * inf would be NaN); a NaN sum stays NaN (a NaN logit may be dropped by
// a vector max, never by the sums).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_rescale_sum(T sum, T factor) {
  return factor == T(0) && !kd_isnan(sum) ? T(0) : sum * factor;
}

// Online (running max, rescaled sum) state of one tensor in one head.
template <typename T>
struct KDSoftmaxState {
  T max;  // running max of the logits (NaN once a NaN was seen)
  T sum;  // sum of 2^((u - kd_exp_base(max)) c)
};

// The running state of one (row, head).
template <typename T>
struct KDHeadState {
  KDSoftmaxState<T> student;
  KDSoftmaxState<T> teacher;
  T a_term;      // A (see the top of this file), relative to the current bases
  T student_inf;  // 1 once a student -inf met a finite teacher logit (the KL is +inf), else 0
};

template <typename T>
RCFAST_HOST_DEVICE inline KDHeadState<T> kd_head_state_init() {
  return {{kd_neg_inf<T>(), T(0)}, {kd_neg_inf<T>(), T(0)}, T(0), T(0)};
}

// Whether a (student, teacher) pair makes the KL +inf: the student has no mass
// where the teacher has some.
template <typename T>
RCFAST_HOST_DEVICE inline bool kd_student_inf(T u_student, T u_teacher) {
  return u_student == kd_neg_inf<T>() && u_teacher > kd_neg_inf<T>();
}

// Move the running state to the maxima max(state, block): rescale both sums
// and correct A for the moved bases. After the call, exponentiate the block
// relative to kd_exp_base(state.<tensor>.max) and add it (kd_accumulate).
template <typename T>
RCFAST_HOST_DEVICE inline void kd_rebase(KDHeadState<T>& state, T block_max_student, T block_max_teacher,
                                         T exp_scale) {
  const T new_max_s = kd_nanmax(state.student.max, block_max_student);
  const T new_max_t = kd_nanmax(state.teacher.max, block_max_teacher);
  if (new_max_s == state.student.max && new_max_t == state.teacher.max) return;
  const T factor_s = kd_rescale_factor(state.student.max, new_max_s, exp_scale);
  const T factor_t = kd_rescale_factor(state.teacher.max, new_max_t, exp_scale);
  // Every bracket of A loses (moved b_t) - (moved b_s). Where the teacher had no
  // mass yet A is 0 and so is l_t (an infinite A means l_t > 0), and where its
  // mass now underflows the factor is 0: both leave A = 0.
  const T moved = (kd_exp_base(new_max_t) - kd_exp_base(state.teacher.max)) -
                  (kd_exp_base(new_max_s) - kd_exp_base(state.student.max));
  const T corrected = state.teacher.sum == T(0) ? state.a_term
                                                : state.a_term - moved * state.teacher.sum * T(kATermScale);
  state.a_term = kd_rescale_sum(corrected, factor_t);
  state.student.sum = kd_rescale_sum(state.student.sum, factor_s);
  state.teacher.sum = kd_rescale_sum(state.teacher.sum, factor_t);
  state.student.max = new_max_s;
  state.teacher.max = new_max_t;
}

// One element's contribution to A: e_t * (gap * kATermScale), masked to 0
// where the teacher's exp is 0 (p_t = 0 adds nothing, even if the student is
// -inf there too and the product would be 0 * inf = NaN). gap = (u_t - b_t) -
// (u_s - b_s).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_a_term(T exp_teacher, T gap) {
  return exp_teacher > T(0) ? exp_teacher * (gap * T(kATermScale)) : T(0);
}

// Add one element (after kd_rebase to at least its values).
template <typename T>
RCFAST_HOST_DEVICE inline void kd_accumulate(KDHeadState<T>& state, T u_student, T u_teacher, T exp_scale) {
  const T v_s = u_student - kd_exp_base(state.student.max);
  const T v_t = u_teacher - kd_exp_base(state.teacher.max);
  const T e_t = kd_exp2(v_t * exp_scale);
  state.student.sum += kd_exp2(v_s * exp_scale);
  state.teacher.sum += e_t;
  state.a_term += kd_a_term(e_t, v_t - v_s);
  if (kd_student_inf(u_student, u_teacher)) state.student_inf = T(1);
}

// Merge two partial states (e.g. two threads' halves of a head).
template <typename T>
RCFAST_HOST_DEVICE inline void kd_merge(KDHeadState<T>& into, KDHeadState<T> other, T exp_scale) {
  kd_rebase(into, other.student.max, other.teacher.max, exp_scale);
  kd_rebase(other, into.student.max, into.teacher.max, exp_scale);
  into.student.sum += other.student.sum;
  into.teacher.sum += other.teacher.sum;
  into.a_term += other.a_term;
  into.student_inf = into.student_inf > other.student_inf ? into.student_inf : other.student_inf;
}

template <typename T>
RCFAST_HOST_DEVICE inline bool kd_has_nan(const KDHeadState<T>& state) {
  return kd_isnan(state.student.max) || kd_isnan(state.teacher.max) || kd_isnan(state.student.sum) ||
         kd_isnan(state.teacher.sum) || kd_isnan(state.a_term);
}

// w * tau^2 * KL(p_t || p_s) of one head from its final state (the top of this
// file), in double; see the semantics above for the degenerate heads.
template <typename T>
RCFAST_HOST_DEVICE inline double kd_head_loss(const KDHeadState<T>& state, double tau, double weight) {
  if (kd_has_nan(state)) return NAN;
  if (state.teacher.max == kd_neg_inf<T>()) return 0.0;  // fully masked head
  if (weight == 0.0) return 0.0;                            // head switched off
  // A student -inf under a finite teacher logit (this includes a student -inf
  // everywhere): the true KL is +inf.
  if (state.student_inf != T(0)) return weight * INFINITY;
  const double mean_gap = static_cast<double>(state.a_term) / kATermScale / static_cast<double>(state.teacher.sum);
  const double log_ratio = log(static_cast<double>(state.student.sum) / static_cast<double>(state.teacher.sum));
  return weight * tau * (mean_gap + tau * log_ratio);
}

// log2 of a final sum, as pass 2 uses it: 0 for an empty head (its exps are
// all 0 and the softmax is taken as 0).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_log2_sum(const KDSoftmaxState<T>& state) {
  return state.max == kd_neg_inf<T>() ? T(0) : kd_log2(state.sum);
}

// Multiplier turning 2^((u - kd_exp_base(block_max)) c), computed while the
// running max was block_max, into coef * softmax with the final state:
// coef * 2^((block_max - final_max) c) / final_sum. 0 where nothing has mass
// (all -inf so far, or a student head with no mass at all).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_grad_factor(T coef, T block_max, const KDSoftmaxState<T>& final_state, T exp_scale) {
  if (final_state.max == kd_neg_inf<T>() || block_max == kd_neg_inf<T>()) return T(0);
  if (block_max == final_state.max) return coef / final_state.sum;  // 2^0: skip the call
  return coef * kd_exp2((block_max - final_state.max) * exp_scale) / final_state.sum;
}

// One gradient element, coef * (softmax_s - softmax_t), from the final bases
// and log2 sums (kd_log2_sum). For kernels that recompute the exps in pass 2
// one element at a time (the CUDA one); the CPU kernel uses the factored form
// 2^((u - b) c) * kd_grad_factor(...).
template <typename T>
RCFAST_HOST_DEVICE inline T kd_grad_element(T coef, T exp_scale, T u_student, T base_student, T log2_sum_student,
                                            bool student_empty, T u_teacher, T base_teacher, T log2_sum_teacher) {
  const T p_s = student_empty ? T(0) : kd_exp2((u_student - base_student) * exp_scale - log2_sum_student);
  const T p_t = kd_exp2((u_teacher - base_teacher) * exp_scale - log2_sum_teacher);
  return coef * (p_s - p_t);
}

}  // namespace kd
}  // namespace rcfast
