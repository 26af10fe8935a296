// kd_cpu_passes.h — the two passes of the CPU kernel over one (row, head),
// vectorised with at::vec (csrc/kd_math.h has the math and its units).
//
// Pass 1, the loss, in one of two ways:
//   direct (kd_head_pass1_direct), the common case: when the sums of exps
//     relative to 0 stay within [kDirectMinSum, kDirectMaxSum] (logits within
//     about 44 tau of 0, as 2^64 = e^44.4), exps can be taken relative to 0
//     instead of the max, so no max pass is needed — l_s, l_t and A in one
//     read of the logits. Whether that holds is read off the results;
//   online (kd_head_pass1_online), the general algorithm: classes in tiles of
//     kTile; the tile's max of the logits is merged into the running state
//     (kd_rebase), then the tile's exps are taken relative to it (the tile is
//     in L1 by then).
// Pass 2, only for the gradient: g = coef (softmax_s - softmax_t) in the
//   student's dtype, either rescaling exps pass 1 cached
//   (kd_head_pass2_cached: no exp recomputed, logits not read again) or
//   recomputing them (kd_head_pass2_recompute).
// The driver (kd_cpu_driver.h) picks the variants per head.
#pragma once

#ifndef CPU_CAPABILITY
#error "kd_cpu_passes.h is compiled by kd_cpu_kernel_<capability>.cpp with CPU_CAPABILITY defined"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../kd_math.h"
#include "kd_vec_exp.h"

namespace rcfast {
namespace cpu {
namespace CPU_CAPABILITY {
// Internal linkage: the capability objects are linked into one library, and no
// helper of one may be picked by the linker for another (that would run
// AVX-512 code on an AVX2 machine).
namespace {

using at::vec::Vectorized;
using kd::KDHeadState;

// Classes per tile of the online pass. A tile of student + teacher fp32 logits
// is 16 KiB and its exps another 16 KiB, so the second read of the tile (the
// exp loop) hits L1; a multiple of every vector block size.
constexpr int64_t kTile = 2048;
// How far ahead the next logits are prefetched while a block is computed.
constexpr int64_t kPrefetchBytes = 4096;
// The direct pass accepts sums of exps in [2^-60, 2^64]: at 2^-60 the largest
// term is >= 2^-78 (C <= 2^18 per tile of exps), so the exp's flush to 0 below
// 2^-125 drops only terms 2^-47 below it; at 2^64 and with coef >= 2^-60, pass
// 2's multiplier coef / sum stays a normal float (a denormal one is flushed to
// 0 by FlushDenormalsGuard, which lost the softmax mass of a logit near the
// exp's overflow: issue 8 item 1).
constexpr double kDirectMinSum = 8.673617379884035e-19;   // 2^-60
constexpr double kDirectMaxSum = 1.8446744073709552e19;   // 2^64
constexpr double kDirectMinCoef = 8.673617379884035e-19;  // 2^-60

template <typename scalar_t>
struct KDAcc {
  using type = float;  // float32 math for float, bfloat16 and half
};
template <>
struct KDAcc<double> {
  using type = double;  // float64 stays float64 (gradcheck exercises the kernel)
};

// Loads/stores between scalar_t memory and Vectorized<acc_t> registers. The
// kernel walks classes in blocks of two vectors (kBlock values), which is also
// what one Vectorized<BFloat16/Half> holds, so reduced-precision stores are a
// single convert + store.
template <typename scalar_t>
struct KDIo {
  using acc_t = typename KDAcc<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();
  static constexpr int64_t kBlock = 2 * kWidth;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  static inline Vec load(const scalar_t* ptr) {
    if constexpr (kReduced) {
      Vec out;
      at::vec::load_to_float<scalar_t>(ptr, out);  // kWidth values, widened
      return out;
    } else {
      return Vec::loadu(ptr);
    }
  }

  // Loads count < kBlock values into (a, b) without reading past them; lanes
  // >= count become -inf, which has exp 0 and is masked out of A, so a tail
  // gets exactly the math of a full block.
  static inline void load_block_partial(const scalar_t* ptr, int64_t count, Vec& a, Vec& b) {
    if constexpr (kReduced) {
      const auto packed = Vectorized<scalar_t>::loadu(ptr, static_cast<int>(count));
      std::tie(a, b) = at::vec::convert_to_float<scalar_t>(packed);
    } else {
      a = Vec::loadu(ptr, std::min(count, kWidth));
      b = count > kWidth ? Vec::loadu(ptr + kWidth, count - kWidth) : Vec(acc_t(0));
    }
    const Vec neg_inf(kd::kd_neg_inf<acc_t>());
    const Vec limit(static_cast<acc_t>(count));
    a = Vec::blendv(neg_inf, a, Vec::arange(acc_t(0), acc_t(1)) < limit);
    b = Vec::blendv(neg_inf, b, Vec::arange(static_cast<acc_t>(kWidth), acc_t(1)) < limit);
  }

  // Stores count <= kBlock values of (a, b), rounding to scalar_t (to nearest even).
  static inline void store_block(scalar_t* ptr, int64_t count, const Vec& a, const Vec& b) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(a, b).store(ptr, static_cast<int>(count));
    } else if (count == kBlock) {
      a.store(ptr);
      b.store(ptr + kWidth);
    } else {
      a.store(ptr, std::min(count, kWidth));
      if (count > kWidth) b.store(ptr + kWidth, count - kWidth);
    }
  }
};

// Hint the next logits into the cache while the current block is computed:
// tasks of a thread read one contiguous range, so "ahead" is simply further
// along the packed [B, N] buffer (a prefetch past its end never faults).
template <typename scalar_t, int64_t kBlockElems>
inline void prefetch_ahead(const scalar_t* ptr) {
  constexpr int64_t kLines = std::max<int64_t>(1, kBlockElems * int64_t(sizeof(scalar_t)) / 64);
  const char* base = reinterpret_cast<const char*>(ptr) + kPrefetchBytes;
  for (int64_t line = 0; line < kLines; ++line) {
    __builtin_prefetch(base + 64 * line, /*rw=*/0, /*locality=*/3);
  }
}

// acc + (weight > 0 ? weight * value : 0): the masked A-term update (a
// teacher exp of 0 adds nothing, even where value is inf or NaN).
template <typename acc_t>
inline Vectorized<acc_t> fmadd_where_positive(const Vectorized<acc_t>& weight, const Vectorized<acc_t>& value,
                                              const Vectorized<acc_t>& acc) {
  const Vectorized<acc_t> zero(acc_t(0));
  return at::vec::fmadd(weight, Vectorized<acc_t>::blendv(zero, value, weight > zero), acc);
}

// acc + (teacher > -inf ? weight * value : 0): the direct pass's A-term
// update. Masked on the teacher logit rather than its exp, so that a student
// -inf under a finite teacher whose exp underflowed gives 0 * inf = NaN, which
// sends the head to the online pass (kd_student_inf decides it there).
template <typename acc_t>
inline Vectorized<acc_t> fmadd_where_teacher_finite(const Vectorized<acc_t>& weight, const Vectorized<acc_t>& value,
                                                    const Vectorized<acc_t>& teacher,
                                                    const Vectorized<acc_t>& acc) {
  const Vectorized<acc_t> zero(acc_t(0));
  const Vectorized<acc_t> neg_inf(kd::kd_neg_inf<acc_t>());
  return at::vec::fmadd(weight, Vectorized<acc_t>::blendv(zero, value, teacher > neg_inf), acc);
}

// Lanes where a student -inf meets a finite teacher logit (kd_student_inf), as a mask.
template <typename acc_t>
inline Vectorized<acc_t> student_inf_lanes(const Vectorized<acc_t>& student, const Vectorized<acc_t>& teacher) {
  const Vectorized<acc_t> neg_inf(kd::kd_neg_inf<acc_t>());
  return (student == neg_inf) & (teacher > neg_inf);
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// Calls body(s0, s1, t0, t1, j) for each block of kBlock classes of [0, n),
// j the block's first class. The last, partial block is padded with -inf
// logits (KDIo::load_block_partial), so the body needs no tail code.
template <typename scalar_t, typename Body>
inline void for_each_block(const scalar_t* student, const scalar_t* teacher, int64_t n, Body&& body) {
  using Io = KDIo<scalar_t>;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  int64_t j = 0;
  for (; j + Io::kBlock <= n; j += Io::kBlock) {
    body(Io::load(student + j), Io::load(student + j + W), Io::load(teacher + j), Io::load(teacher + j + W), j);
  }
  if (j < n) {
    Vec s0, s1, t0, t1;
    Io::load_block_partial(student + j, n - j, s0, s1);
    Io::load_block_partial(teacher + j, n - j, t0, t1);
    body(s0, s1, t0, t1, j);
  }
}

// Where pass 1 leaves the exps for pass 2 (kd_head_pass2_cached): per class,
// 2^((u - base) c) of student and teacher (rounded up to whole blocks), and
// per tile the running max each tile's exps are relative to.
template <typename acc_t>
struct KDExpCache {
  acc_t* exp_student;
  acc_t* exp_teacher;
  acc_t* tile_max_student;
  acc_t* tile_max_teacher;
};

// Pass 1, general: online max / sum of exps and A over tiles of kTile classes.
template <typename scalar_t, bool kStoreExps>
inline KDHeadState<typename KDAcc<scalar_t>::type> kd_head_pass1_online(
    const scalar_t* student, const scalar_t* teacher, int64_t num_classes, typename KDAcc<scalar_t>::type exp_scale,
    const KDExpCache<typename KDAcc<scalar_t>::type>& cache) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec neg_inf(kd::kd_neg_inf<acc_t>());
  const Vec zero(acc_t(0));
  const Vec exp_scale_v(exp_scale);
  const Vec a_scale(static_cast<acc_t>(kd::kATermScale));

  KDHeadState<acc_t> state = kd::kd_head_state_init<acc_t>();
  int64_t tile = 0;
  for (int64_t j0 = 0; j0 < num_classes; j0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, num_classes - j0);
    const scalar_t* s_tile = student + j0;
    const scalar_t* t_tile = teacher + j0;

    // The tile's max. A max may drop a NaN, but a NaN logit then gives a NaN
    // exp and so a NaN sum, and a +inf logit makes the base +inf and its own
    // exp NaN (inf - inf): both reach kd_head_loss as NaN.
    // Alongside, the lanes where a student -inf meets a finite teacher logit.
    Vec max_s0 = neg_inf, max_s1 = neg_inf, max_t0 = neg_inf, max_t1 = neg_inf, inf_lanes = zero;
    for_each_block(s_tile, t_tile, n, [&](const Vec& s0, const Vec& s1, const Vec& t0, const Vec& t1, int64_t) {
      max_s0 = at::vec::clamp_min(s0, max_s0);
      max_s1 = at::vec::clamp_min(s1, max_s1);
      max_t0 = at::vec::clamp_min(t0, max_t0);
      max_t1 = at::vec::clamp_min(t1, max_t1);
      inf_lanes = inf_lanes | student_inf_lanes(s0, t0) | student_inf_lanes(s1, t1);
    });
    if (hmax(Vec::blendv(zero, Vec(acc_t(1)), inf_lanes)) > acc_t(0)) state.student_inf = acc_t(1);
    kd::kd_rebase(state, hmax(at::vec::clamp_min(max_s0, max_s1)), hmax(at::vec::clamp_min(max_t0, max_t1)),
                  exp_scale);
    if constexpr (kStoreExps) {
      cache.tile_max_student[tile] = state.student.max;
      cache.tile_max_teacher[tile] = state.teacher.max;
    }

    const Vec base_s(kd::kd_exp_base(state.student.max));
    const Vec base_t(kd::kd_exp_base(state.teacher.max));
    Vec sum_s0 = zero, sum_s1 = zero, sum_t0 = zero, sum_t1 = zero, a0 = zero, a1 = zero;
    for_each_block(s_tile, t_tile, n, [&](const Vec& s0, const Vec& s1, const Vec& t0, const Vec& t1, int64_t j) {
      prefetch_ahead<scalar_t, Io::kBlock>(s_tile + j);
      prefetch_ahead<scalar_t, Io::kBlock>(t_tile + j);
      const Vec vs0 = s0 - base_s, vs1 = s1 - base_s, vt0 = t0 - base_t, vt1 = t1 - base_t;
      const Vec es0 = kd_vexp2(vs0 * exp_scale_v), es1 = kd_vexp2(vs1 * exp_scale_v);
      const Vec et0 = kd_vexp2(vt0 * exp_scale_v), et1 = kd_vexp2(vt1 * exp_scale_v);
      sum_s0 = sum_s0 + es0;
      sum_s1 = sum_s1 + es1;
      sum_t0 = sum_t0 + et0;
      sum_t1 = sum_t1 + et1;
      a0 = fmadd_where_positive(et0, (vt0 - vs0) * a_scale, a0);  // kd_a_term, vectorised
      a1 = fmadd_where_positive(et1, (vt1 - vs1) * a_scale, a1);
      if constexpr (kStoreExps) {
        es0.store(cache.exp_student + j0 + j);
        es1.store(cache.exp_student + j0 + j + W);
        et0.store(cache.exp_teacher + j0 + j);
        et1.store(cache.exp_teacher + j0 + j + W);
      }
    });
    state.student.sum += hsum(sum_s0 + sum_s1);
    state.teacher.sum += hsum(sum_t0 + sum_t1);
    state.a_term += hsum(a0 + a1);
  }
  return state;
}

// Pass 1 in one sweep, exps relative to 0 (no max pass). Valid when every sum
// lies in [kDirectMinSum, kDirectMaxSum] and A is finite: no exp overflowed or
// was flushed where it mattered, no NaN (kd_vexp2_product keeps NaN), no
// student -inf under a finite teacher logit (whose +inf the online pass
// decides).
// Otherwise it returns false and the caller runs kd_head_pass1_online. On
// success the state holds sums relative to base 0 (max = 0), and with
// kStoreExps the exps and zero tile maxima are in the cache, as the online
// pass would leave them.
template <typename scalar_t, bool kStoreExps>
inline bool kd_head_pass1_direct(const scalar_t* student, const scalar_t* teacher, int64_t num_classes,
                                 typename KDAcc<scalar_t>::type exp_scale,
                                 const KDExpCache<typename KDAcc<scalar_t>::type>& cache,
                                 KDHeadState<typename KDAcc<scalar_t>::type>& state) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec zero(acc_t(0));
  const Vec exp_scale_v(exp_scale);

  Vec sum_s0 = zero, sum_s1 = zero, sum_t0 = zero, sum_t1 = zero, a0 = zero, a1 = zero;
  for_each_block(student, teacher, num_classes,
                 [&](const Vec& s0, const Vec& s1, const Vec& t0, const Vec& t1, int64_t j) {
                   prefetch_ahead<scalar_t, Io::kBlock>(student + j);
                   prefetch_ahead<scalar_t, Io::kBlock>(teacher + j);
                   const Vec es0 = kd_vexp2_product(s0, exp_scale_v), es1 = kd_vexp2_product(s1, exp_scale_v);
                   const Vec et0 = kd_vexp2_product(t0, exp_scale_v), et1 = kd_vexp2_product(t1, exp_scale_v);
                   sum_s0 = sum_s0 + es0;
                   sum_s1 = sum_s1 + es1;
                   sum_t0 = sum_t0 + et0;
                   sum_t1 = sum_t1 + et1;
                   // Base 0: the gap is t - s (bounded here; an overflow makes A
                   // infinite, and then the online pass takes over).
                   a0 = fmadd_where_teacher_finite(et0, t0 - s0, t0, a0);
                   a1 = fmadd_where_teacher_finite(et1, t1 - s1, t1, a1);
                   if constexpr (kStoreExps) {
                     es0.store(cache.exp_student + j);
                     es1.store(cache.exp_student + j + W);
                     et0.store(cache.exp_teacher + j);
                     et1.store(cache.exp_teacher + j + W);
                   }
                 });
  const acc_t sum_s = hsum(sum_s0 + sum_s1);
  const acc_t sum_t = hsum(sum_t0 + sum_t1);
  const acc_t a_term = hsum(a0 + a1) * static_cast<acc_t>(kd::kATermScale);
  auto in_range = [](acc_t sum) {
    return sum >= static_cast<acc_t>(kDirectMinSum) && sum <= static_cast<acc_t>(kDirectMaxSum);
  };
  if (!(in_range(sum_s) && in_range(sum_t) && std::isfinite(a_term))) return false;
  state.student = {acc_t(0), sum_s};
  state.teacher = {acc_t(0), sum_t};
  state.a_term = a_term;
  state.student_inf = acc_t(0);  // a student -inf under a finite teacher made A NaN or inf above
  if constexpr (kStoreExps) {
    for (int64_t tile = 0; tile * kTile < num_classes; ++tile) {
      cache.tile_max_student[tile] = acc_t(0);
      cache.tile_max_teacher[tile] = acc_t(0);
    }
  }
  return true;
}

// Pass 2 from the exps cached by pass 1: per tile, one multiplier each turns
// the cached exp into coef * softmax with the final max and sum.
template <typename scalar_t>
inline void kd_head_pass2_cached(scalar_t* grad, int64_t num_classes,
                                 const KDHeadState<typename KDAcc<scalar_t>::type>& state,
                                 typename KDAcc<scalar_t>::type coef, typename KDAcc<scalar_t>::type exp_scale,
                                 const KDExpCache<typename KDAcc<scalar_t>::type>& cache) {
  using Io = KDIo<scalar_t>;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  int64_t tile = 0;
  for (int64_t j0 = 0; j0 < num_classes; j0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, num_classes - j0);
    const Vec factor_s(kd::kd_grad_factor(coef, cache.tile_max_student[tile], state.student, exp_scale));
    const Vec factor_t(kd::kd_grad_factor(coef, cache.tile_max_teacher[tile], state.teacher, exp_scale));
    for (int64_t j = 0; j < n; j += Io::kBlock) {
      const int64_t c = j0 + j;
      const Vec g0 = at::vec::fmsub(Vec::loadu(cache.exp_student + c), factor_s,
                                    Vec::loadu(cache.exp_teacher + c) * factor_t);
      const Vec g1 = at::vec::fmsub(Vec::loadu(cache.exp_student + c + W), factor_s,
                                    Vec::loadu(cache.exp_teacher + c + W) * factor_t);
      Io::store_block(grad + c, std::min<int64_t>(Io::kBlock, n - j), g0, g1);
    }
  }
}

// Pass 2 without a cache: re-read the logits and recompute the exps.
template <typename scalar_t>
inline void kd_head_pass2_recompute(const scalar_t* student, const scalar_t* teacher, scalar_t* grad,
                                    int64_t num_classes, const KDHeadState<typename KDAcc<scalar_t>::type>& state,
                                    typename KDAcc<scalar_t>::type coef, typename KDAcc<scalar_t>::type exp_scale) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  const Vec exp_scale_v(exp_scale);
  const Vec base_s(kd::kd_exp_base(state.student.max));
  const Vec base_t(kd::kd_exp_base(state.teacher.max));
  const Vec factor_s(kd::kd_grad_factor(coef, state.student.max, state.student, exp_scale));
  const Vec factor_t(kd::kd_grad_factor(coef, state.teacher.max, state.teacher, exp_scale));
  auto sweep = [&](auto exp_of_student, auto exp_of_teacher) {
    for_each_block(student, teacher, num_classes,
                   [&](const Vec& s0, const Vec& s1, const Vec& t0, const Vec& t1, int64_t j) {
                     prefetch_ahead<scalar_t, Io::kBlock>(student + j);
                     prefetch_ahead<scalar_t, Io::kBlock>(teacher + j);
                     const Vec g0 = at::vec::fmsub(exp_of_student(s0), factor_s, exp_of_teacher(t0) * factor_t);
                     const Vec g1 = at::vec::fmsub(exp_of_student(s1), factor_s, exp_of_teacher(t1) * factor_t);
                     Io::store_block(grad + j, std::min<int64_t>(Io::kBlock, num_classes - j), g0, g1);
                   });
  };
  if (state.student.max == acc_t(0) && state.teacher.max == acc_t(0)) {
    // Base 0 (the direct pass): the exact-product exp, as pass 1 computed it.
    auto exp_direct = [&](const Vec& u) { return kd_vexp2_product(u, exp_scale_v); };
    sweep(exp_direct, exp_direct);
  } else {
    sweep([&](const Vec& u) { return kd_vexp2((u - base_s) * exp_scale_v); },
          [&](const Vec& u) { return kd_vexp2((u - base_t) * exp_scale_v); });
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rcfast
