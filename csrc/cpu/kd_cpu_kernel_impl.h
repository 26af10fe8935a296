// kd_cpu_kernel_impl.h — the vectorised CPU kernel of rcfast::multihead_kd_fwd.
//
// This file is the kernel *body*. It is not compiled on its own: each of
// kd_cpu_kernel_{default,avx2,avx512}.cpp includes it after build_ext.py has
// defined CPU_CAPABILITY (and CPU_CAPABILITY_AVX2/AVX512 plus the matching
// -m flags), so at::vec::Vectorized<float> is 16 lanes of AVX-512, 8 of AVX2,
// or the portable scalar fallback, and every copy lands in its own namespace
// rcfast::cpu::<CPU_CAPABILITY>. kd_cpu.cpp picks one at runtime.
//
// Algorithm (DESIGN.md "The kernel algorithm"), one task per (row, head):
//   pass 1, the loss. Usually one sweep (kd_head_pass1_direct): when the
//     logits are within about ±44 tau of 0 — checked afterwards from maxima
//     gathered on the way — exps can be taken relative to 0 instead of the
//     max, so no max pass is needed: Σexp for student and teacher and
//     A = Σ exp(x_t)(x_t - x_s) in one read of the logits. Otherwise
//     (kd_head_pass1_online, the general algorithm), classes in tiles of
//     kTile: the tile's max of the raw logits, merged into the running max
//     (rescaling the running sums), then exps relative to it (the tile is in
//     L1 by then). Either way KL = A/l_t - lse_t + lse_s needs nothing more.
//   pass 2, only when compute_grad: g = coef (softmax_s - softmax_t) in the
//     student's dtype. CPU specialisation: when a thread-local scratch of
//     2 * C_h floats fits the memory budget (5% of the gradient, over all
//     threads), pass 1 stores its exps there and pass 2 only rescales them
//     (no exp recomputed, logits not read again). Otherwise pass 2 re-reads
//     the logits and recomputes the exps (wide heads / tiny batches).
// Exps are base-2 with log2(e) folded into the scale (kd_vexp2*), a short
// inline polynomial rather than a call into Sleef; the exp throughput is
// what bounds this kernel once the logits stream from memory.
// Per-(row, head) losses go to a [B, H] buffer and are reduced in a fixed
// order after the parallel loop, so results are bitwise identical for any
// thread count.
#pragma once

#ifndef CPU_CAPABILITY
#error "kd_cpu_kernel_impl.h is compiled by kd_cpu_kernel_<capability>.cpp with CPU_CAPABILITY defined"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/intrinsics.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../kd_math.h"
#include "kd_cpu.h"

namespace rcfast {
namespace cpu {
namespace CPU_CAPABILITY {
// Everything below has internal linkage: the three capability objects are
// linked into one library, and no helper of one may be picked by the linker
// for another (that would run AVX-512 code on an AVX2 machine).
namespace {

using at::vec::Vectorized;
using kd::KDSoftmaxState;

// Classes per tile of pass 1. A tile of student + teacher fp32 logits is 16 KiB
// and its exps another 16 KiB, so the second read of the tile (the exp loop)
// hits L1 (48 KiB per core here); multiple of every vector block size.
constexpr int64_t kTile = 2048;
// Parallel chunks get at least this many logits each (parallel_for grain), so
// tiny calls do not pay for waking the OpenMP team.
constexpr int64_t kMinElementsPerChunk = 32768;
// The exp cache may use at most this fraction of the gradient's size (the
// issue's cap on extra memory), split across the threads.
#ifndef RCFAST_KD_SCRATCH_FRACTION
#define RCFAST_KD_SCRATCH_FRACTION 0.05
#endif
constexpr double kScratchFractionOfGrad = RCFAST_KD_SCRATCH_FRACTION;

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

  // Loads count < kBlock values into (a, b) without reading past them (masked
  // loads on AVX-512); lanes >= count become -inf, which has exp 0 and is
  // masked out of A, so a tail gets exactly the math of a full block.
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

  // Stores count <= kBlock values of (a, b), rounding to scalar_t (to nearest
  // even); partial blocks use masked stores on AVX-512.
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

// The vector exponential of the kernel, in base 2: exps are taken as
// 2^(logit * (log2(e) / tau) - max * log2(e)), so that folding log2(e) into
// the per-head scale leaves one FMA for the argument and the exp itself is
// only "round, polynomial, scale":
//   v = max(y, -125), n = round(v), f = v - n in [-1/2, 1/2]
//   2^f = 1 + f (c1 + f (c2 + f (c3 + f (c4 + f c5)))), a relative-error
//         near-minimax fit (max 1.1e-7 = 0.9 ulp before rounding)
//   2^v = 2^f * 2^n (AVX-512: vscalefps; AVX2: exponent bits), and 0 where
//         y < -125 (incl. -inf: a masked class gets exactly p = 0).
// No result is ever denormal: producing one costs a ~150-cycle microcode
// assist (measured: 32x slower for arguments near -140), and values below
// 2^-125 = 2.4e-38 are irrelevant to every sum here.
// Measured against double exp2 over [-125, 0] (AVX-512 and AVX2): max
// relative error 1.7e-7 (1.4 ulp), mean -2e-8; throughput on this machine's
// AVX-512 0.25 ns/value, versus 0.41 for at::vec's exp_u20 (3.6e-7) and 0.54
// for Sleef's 1-ulp exp (a call per vector). NaN is not propagated by it
// (it maps NaN to 0): NaN inputs are detected through the NaN-propagating max
// instead. The DEFAULT build and float64 use at::vec's exp2 (std::exp2 /
// Sleef); RCFAST_KD_SLEEF_EXP forces Sleef everywhere.
constexpr float kExp2C1 = 0.6931470036506653f;
constexpr float kExp2C2 = 0.24022242426872253f;
constexpr float kExp2C3 = 0.05550733581185341f;
constexpr float kExp2C4 = 0.009671512991189957f;
constexpr float kExp2C5 = 0.0013264722656458616f;

#if !defined(RCFAST_KD_SLEEF_EXP) && defined(CPU_CAPABILITY_AVX512)
#define RCFAST_KD_OWN_EXP2 1
inline __m512 exp2_poly(__m512 f) {
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExp2C5), f, _mm512_set1_ps(kExp2C4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2C1));
  return _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
}
#elif !defined(RCFAST_KD_SLEEF_EXP) && defined(CPU_CAPABILITY_AVX2)
#define RCFAST_KD_OWN_EXP2 1
inline __m256 exp2_poly(__m256 f) {
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExp2C5), f, _mm256_set1_ps(kExp2C4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C1));
  return _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
}
// 2^f * 2^n for integral n >= -125 (a normal number), 0 where !in_range.
inline __m256 exp2_scale(__m256 p, __m256 n, __m256 in_range) {
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(in_range, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}
#endif

// 2^y.
template <typename acc_t>
inline Vectorized<acc_t> kd_vexp2(const Vectorized<acc_t>& y) {
#if defined(RCFAST_KD_OWN_EXP2)
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 lowest = _mm512_set1_ps(-125.0f);
    const __mmask16 in_range = _mm512_cmp_ps_mask(y, lowest, _CMP_GE_OQ);  // false for NaN too
    const __m512 n = _mm512_roundscale_ps(_mm512_max_ps(y, lowest), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(y, n);
    return Vectorized<float>(_mm512_maskz_scalef_ps(in_range, exp2_poly(f), n));
#else
    const __m256 lowest = _mm256_set1_ps(-125.0f);
    const __m256 in_range = _mm256_cmp_ps(y, lowest, _CMP_GE_OQ);
    const __m256 n = _mm256_round_ps(_mm256_max_ps(y, lowest), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return Vectorized<float>(exp2_scale(exp2_poly(_mm256_sub_ps(y, n)), n, in_range));
#endif
  }
#endif
  return y.exp2();
}

// 2^(x * c), with the fraction f = x c - n taken by an FMA from the exact
// product: as accurate for |x c| ~ 60 as for small arguments (a rounded
// product would lose |x c| * 2^-24 in the exponent). Same cost as kd_vexp2.
// Unlike kd_vexp2 it keeps NaN (the direct pass relies on a NaN or infinite
// sum to fall back) and overflows to +inf; -inf and arguments below -125 give 0.
template <typename acc_t>
inline Vectorized<acc_t> kd_vexp2_product(const Vectorized<acc_t>& x, const Vectorized<acc_t>& c) {
#if defined(RCFAST_KD_OWN_EXP2)
  if constexpr (std::is_same_v<acc_t, float>) {
    const Vectorized<float> y = x * c;
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 lowest = _mm512_set1_ps(-125.0f);
    const __mmask16 keep = _mm512_cmp_ps_mask(y, lowest, _CMP_NLT_UQ);  // y >= -125 or NaN
    const __m512 n = _mm512_roundscale_ps(_mm512_max_ps(y, lowest), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Dropped lanes get a meaningless f (never denormal); NaN lanes a NaN f.
    const __m512 f = _mm512_fmsub_ps(x, c, n);
    return Vectorized<float>(_mm512_maskz_scalef_ps(keep, exp2_poly(f), n));
#else
    const __m256 lowest = _mm256_set1_ps(-125.0f);
    const __m256 keep = _mm256_cmp_ps(y, lowest, _CMP_NLT_UQ);
    // Clamped above too: 2^n must stay a valid exponent field (2^127 * 2^f >= 2^127 rounds to +inf later).
    const __m256 n = _mm256_round_ps(_mm256_min_ps(_mm256_max_ps(y, lowest), _mm256_set1_ps(127.0f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 big = _mm256_cmp_ps(y, _mm256_set1_ps(128.0f), _CMP_GE_OQ);
    const __m256 value = exp2_scale(exp2_poly(_mm256_fmsub_ps(x, c, n)), n, keep);
    return Vectorized<float>(_mm256_blendv_ps(value, _mm256_set1_ps(INFINITY), big));
#endif
  }
#endif
  return (x * c).exp2();
}

// Hint the next logits into the cache while the current tile is computed:
// tasks of a thread read one contiguous range, so "ahead" is simply further
// along the packed [B, N] buffer (a prefetch past its end never faults).
#ifndef RCFAST_KD_PREFETCH_BYTES
#define RCFAST_KD_PREFETCH_BYTES 4096
#endif
constexpr int64_t kPrefetchBytes = RCFAST_KD_PREFETCH_BYTES;
template <typename scalar_t, int64_t kBlockElems>
inline void prefetch_ahead(const scalar_t* ptr) {
  constexpr int64_t kLines = std::max<int64_t>(1, kBlockElems * int64_t(sizeof(scalar_t)) / 64);
  const char* base = reinterpret_cast<const char*>(ptr) + kPrefetchBytes;
#ifndef RCFAST_KD_NO_PREFETCH
  for (int64_t line = 0; line < kLines; ++line) {
    __builtin_prefetch(base + 64 * line, /*rw=*/0, /*locality=*/3);
  }
#endif
}

// acc + (weight > 0 ? weight * value : 0): the masked A-term update. AVX-512
// does it in a compare into a mask register and one masked FMA; at::vec's
// blendv would round-trip the mask through a vector register.
template <typename acc_t>
inline Vectorized<acc_t> fmadd_where_positive(const Vectorized<acc_t>& weight, const Vectorized<acc_t>& value,
                                              const Vectorized<acc_t>& acc) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __mmask16 positive = _mm512_cmp_ps_mask(weight, _mm512_setzero_ps(), _CMP_GT_OQ);
    return Vectorized<float>(_mm512_mask3_fmadd_ps(weight, value, acc, positive));
  } else {
    const __mmask8 positive = _mm512_cmp_pd_mask(weight, _mm512_setzero_pd(), _CMP_GT_OQ);
    return Vectorized<double>(_mm512_mask3_fmadd_pd(weight, value, acc, positive));
  }
#else
  const Vectorized<acc_t> zero(acc_t(0));
  return at::vec::fmadd(weight, Vectorized<acc_t>::blendv(zero, value, weight > zero), acc);
#endif
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  // NaN-propagating (at::vec::maximum), although NaN logits are caught by the probe sums.
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, v);
}

// Calls body(s0, s1, t0, t1, j) for each block of kBlock classes of [0, n),
// j the block's first class. The last, partial block is padded with -inf
// logits (KDIo::load_block_partial), so the body needs no tail code.
template <typename scalar_t, typename Body>
inline void for_each_block(const scalar_t* student, const scalar_t* teacher, int64_t n, Body&& body) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  int64_t j = 0;
  for (; j + Io::kBlock <= n; j += Io::kBlock) {
    body(Io::load(student + j), Io::load(student + j + W), Io::load(teacher + j),
         Io::load(teacher + j + W), j);
  }
  if (j < n) {
    Vec s0, s1, t0, t1;
    Io::load_block_partial(student + j, n - j, s0, s1);
    Io::load_block_partial(teacher + j, n - j, t0, t1);
    body(s0, s1, t0, t1, j);
  }
}

// What pass 1 leaves for finalisation and pass 2.
template <typename acc_t>
struct KDHeadStats {
  KDSoftmaxState<acc_t> student;
  KDSoftmaxState<acc_t> teacher;
  acc_t a_term;
};

// Pass 1 over one (row, head): online max/sum-exp of x = logit * inv_tau for
// student and teacher and the A term. With kStoreExps, also writes
// exp(x - base) to exp_student/exp_teacher (indexed by class, rounded up to
// whole blocks) and the running max used for each tile to tile_max_*.
template <typename scalar_t, bool kStoreExps>
inline KDHeadStats<typename KDAcc<scalar_t>::type> kd_head_pass1_online(
    const scalar_t* student, const scalar_t* teacher, int64_t num_classes,
    typename KDAcc<scalar_t>::type inv_tau, typename KDAcc<scalar_t>::type* exp_student,
    typename KDAcc<scalar_t>::type* exp_teacher, typename KDAcc<scalar_t>::type* tile_max_student,
    typename KDAcc<scalar_t>::type* tile_max_teacher) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec neg_inf(kd::kd_neg_inf<acc_t>());
  const Vec zero(acc_t(0));
  const Vec inv_tau_v(inv_tau);
  const acc_t kLog2e = static_cast<acc_t>(1.4426950408889634);
  const Vec scale2_v(inv_tau * kLog2e);  // exps in base 2, see kd_vexp2
  const Vec nan_probe_scale(static_cast<acc_t>(7.888609052210118e-31));  // 2^-100

  KDHeadStats<acc_t> stats{kd::kd_softmax_state_init<acc_t>(), kd::kd_softmax_state_init<acc_t>(),
                           acc_t(0)};
  int64_t tile = 0;
  for (int64_t j0 = 0; j0 < num_classes; j0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, num_classes - j0);
    const scalar_t* s_tile = student + j0;
    const scalar_t* t_tile = teacher + j0;

    // Tile max of the raw logits: x = logit * inv_tau with inv_tau > 0 is
    // monotone and correctly rounded, so max(x) == max(logit) * inv_tau.
    // A plain max loses NaN, so NaN is caught by a probe sum (logit * 2^-100:
    // NaN-propagating, and it cannot overflow to +inf, so a masked -inf never
    // meets a +inf); only a +inf logit could also give NaN, and +inf logits
    // make the softmax itself NaN anyway.
    Vec max_s0 = neg_inf, max_s1 = neg_inf, max_t0 = neg_inf, max_t1 = neg_inf;
    Vec probe_s = zero, probe_t = zero;
    for_each_block(s_tile, t_tile, n, [&](const Vec& s0, const Vec& s1, const Vec& t0, const Vec& t1, int64_t) {
      max_s0 = at::vec::clamp_min(s0, max_s0);
      max_s1 = at::vec::clamp_min(s1, max_s1);
      max_t0 = at::vec::clamp_min(t0, max_t0);
      max_t1 = at::vec::clamp_min(t1, max_t1);
      probe_s = at::vec::fmadd(s0 + s1, nan_probe_scale, probe_s);
      probe_t = at::vec::fmadd(t0 + t1, nan_probe_scale, probe_t);
    });
    acc_t tile_max_s = hmax(at::vec::clamp_min(max_s0, max_s1)) * inv_tau;
    acc_t tile_max_t = hmax(at::vec::clamp_min(max_t0, max_t1)) * inv_tau;
    if (kd::kd_isnan(hsum(probe_s))) tile_max_s = std::numeric_limits<acc_t>::quiet_NaN();
    if (kd::kd_isnan(hsum(probe_t))) tile_max_t = std::numeric_limits<acc_t>::quiet_NaN();
    kd::kd_merge_block_max(stats.student, tile_max_s);
    const acc_t teacher_factor = kd::kd_merge_block_max(stats.teacher, tile_max_t);
    stats.a_term = kd::kd_rescale_sum(stats.a_term, teacher_factor);
    if constexpr (kStoreExps) {
      tile_max_student[tile] = stats.student.max;
      tile_max_teacher[tile] = stats.teacher.max;
    }

    const Vec neg_base_s(-kd::kd_exp_base(stats.student.max) * kLog2e);
    const Vec neg_base_t(-kd::kd_exp_base(stats.teacher.max) * kLog2e);
    Vec sum_s0 = zero, sum_s1 = zero, sum_t0 = zero, sum_t1 = zero, a0 = zero, a1 = zero;
    for_each_block(s_tile, t_tile, n, [&](const Vec& s0, const Vec& s1, const Vec& t0, const Vec& t1, int64_t j) {
      prefetch_ahead<scalar_t, Io::kBlock>(s_tile + j);
      prefetch_ahead<scalar_t, Io::kBlock>(t_tile + j);
      const Vec es0 = kd_vexp2(at::vec::fmadd(s0, scale2_v, neg_base_s));
      const Vec es1 = kd_vexp2(at::vec::fmadd(s1, scale2_v, neg_base_s));
      const Vec et0 = kd_vexp2(at::vec::fmadd(t0, scale2_v, neg_base_t));
      const Vec et1 = kd_vexp2(at::vec::fmadd(t1, scale2_v, neg_base_t));
      sum_s0 = sum_s0 + es0;
      sum_s1 = sum_s1 + es1;
      sum_t0 = sum_t0 + et0;
      sum_t1 = sum_t1 + et1;
      // kd_a_term, vectorised: x_t - x_s (as t/tau - s/tau: no overflow of
      // t - s), masked to 0 where p_t = 0 (0 * inf would be NaN).
      a0 = fmadd_where_positive(et0, at::vec::fmsub(t0, inv_tau_v, s0 * inv_tau_v), a0);
      a1 = fmadd_where_positive(et1, at::vec::fmsub(t1, inv_tau_v, s1 * inv_tau_v), a1);
      if constexpr (kStoreExps) {
        es0.store(exp_student + j0 + j);
        es1.store(exp_student + j0 + j + W);
        et0.store(exp_teacher + j0 + j);
        et1.store(exp_teacher + j0 + j + W);
      }
    });
    stats.student.sum += hsum(sum_s0 + sum_s1);
    stats.teacher.sum += hsum(sum_t0 + sum_t1);
    stats.a_term += hsum(a0 + a1);
  }
  return stats;
}

// Smallest sum of exps the direct pass accepts: with sum >= 2^-60 the
// largest term is >= 2^-78 (C <= 2^18), so the flush to 0 below 2^-125 only
// drops terms 2^-47 below it.
constexpr double kDirectMinSum = 8.673617379884035e-19;  // 2^-60

// Pass 1 in one sweep, for the common case of logits within about ±40 tau of
// 0: exps relative to 0 instead of the max, so no max pass is needed — Σexp of
// student and teacher and A in one read of the logits. Whether that case
// holds is read off the results: every sum finite (no exp overflowed, no NaN
// — kd_vexp2_product keeps NaN) and not tiny (the terms that matter were not
// flushed). Otherwise (large or very negative logits, NaN, or a student -inf
// where the teacher has mass, whose +inf needs the exact algorithm) it
// returns false and the caller runs kd_head_pass1_online. On success stats
// hold sums relative to base 0 (max = 0), and with kStoreExps the exps and
// zero tile maxima are in the scratch, as the online pass would leave them.
template <typename scalar_t, bool kStoreExps>
inline bool kd_head_pass1_direct(const scalar_t* student, const scalar_t* teacher, int64_t num_classes,
                                 typename KDAcc<scalar_t>::type inv_tau, typename KDAcc<scalar_t>::type* exp_student,
                                 typename KDAcc<scalar_t>::type* exp_teacher,
                                 typename KDAcc<scalar_t>::type* tile_max_student,
                                 typename KDAcc<scalar_t>::type* tile_max_teacher,
                                 KDHeadStats<typename KDAcc<scalar_t>::type>& stats) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec zero(acc_t(0));
  const Vec scale2_v(inv_tau * static_cast<acc_t>(1.4426950408889634));

  Vec sum_s0 = zero, sum_s1 = zero, sum_t0 = zero, sum_t1 = zero, a0 = zero, a1 = zero;
  for_each_block(student, teacher, num_classes,
                 [&](const Vec& s0, const Vec& s1, const Vec& t0, const Vec& t1, int64_t j) {
                   prefetch_ahead<scalar_t, Io::kBlock>(student + j);
                   prefetch_ahead<scalar_t, Io::kBlock>(teacher + j);
                   const Vec es0 = kd_vexp2_product(s0, scale2_v), es1 = kd_vexp2_product(s1, scale2_v);
                   const Vec et0 = kd_vexp2_product(t0, scale2_v), et1 = kd_vexp2_product(t1, scale2_v);
                   sum_s0 = sum_s0 + es0;
                   sum_s1 = sum_s1 + es1;
                   sum_t0 = sum_t0 + et0;
                   sum_t1 = sum_t1 + et1;
                   // A / inv_tau = Σ e_t (t - s); an overflow of t - s makes A
                   // infinite, and then the online pass takes over.
                   a0 = fmadd_where_positive(et0, t0 - s0, a0);
                   a1 = fmadd_where_positive(et1, t1 - s1, a1);
                   if constexpr (kStoreExps) {
                     es0.store(exp_student + j);
                     es1.store(exp_student + j + W);
                     et0.store(exp_teacher + j);
                     et1.store(exp_teacher + j + W);
                   }
                 });
  const acc_t sum_s = hsum(sum_s0 + sum_s1);
  const acc_t sum_t = hsum(sum_t0 + sum_t1);
  const acc_t a_term = hsum(a0 + a1) * inv_tau;
  const bool usable = std::isfinite(sum_s) && std::isfinite(sum_t) && std::isfinite(a_term) &&
                      sum_s >= static_cast<acc_t>(kDirectMinSum) && sum_t >= static_cast<acc_t>(kDirectMinSum);
  if (!usable) return false;
  stats.student = {acc_t(0), sum_s};
  stats.teacher = {acc_t(0), sum_t};
  stats.a_term = a_term;
  if constexpr (kStoreExps) {
    for (int64_t tile = 0; tile * kTile < num_classes; ++tile) {
      tile_max_student[tile] = acc_t(0);
      tile_max_teacher[tile] = acc_t(0);
    }
  }
  return true;
}

// Pass 2 from the exps cached by pass 1: per tile, one multiplier each turns
// the cached exp into coef * softmax with the final max and sum.
template <typename scalar_t>
inline void kd_head_pass2_cached(scalar_t* grad, int64_t num_classes,
                                 const KDHeadStats<typename KDAcc<scalar_t>::type>& stats,
                                 typename KDAcc<scalar_t>::type coef,
                                 const typename KDAcc<scalar_t>::type* exp_student,
                                 const typename KDAcc<scalar_t>::type* exp_teacher,
                                 const typename KDAcc<scalar_t>::type* tile_max_student,
                                 const typename KDAcc<scalar_t>::type* tile_max_teacher) {
  using Io = KDIo<scalar_t>;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  int64_t tile = 0;
  for (int64_t j0 = 0; j0 < num_classes; j0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, num_classes - j0);
    const Vec factor_s(kd::kd_grad_factor(coef, tile_max_student[tile], stats.student));
    const Vec factor_t(kd::kd_grad_factor(coef, tile_max_teacher[tile], stats.teacher));
    for (int64_t j = 0; j < n; j += Io::kBlock) {
      const int64_t c = j0 + j;
      const Vec g0 = at::vec::fmsub(Vec::loadu(exp_student + c), factor_s, Vec::loadu(exp_teacher + c) * factor_t);
      const Vec g1 = at::vec::fmsub(Vec::loadu(exp_student + c + W), factor_s,
                                    Vec::loadu(exp_teacher + c + W) * factor_t);
      Io::store_block(grad + c, std::min<int64_t>(Io::kBlock, n - j), g0, g1);
    }
  }
}

// Pass 2 without a cache: re-read the logits and recompute the exps.
template <typename scalar_t>
inline void kd_head_pass2_recompute(const scalar_t* student, const scalar_t* teacher, scalar_t* grad,
                                    int64_t num_classes, typename KDAcc<scalar_t>::type inv_tau,
                                    const KDHeadStats<typename KDAcc<scalar_t>::type>& stats,
                                    typename KDAcc<scalar_t>::type coef) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  const acc_t kLog2e = static_cast<acc_t>(1.4426950408889634);
  const Vec scale2_v(inv_tau * kLog2e);  // exps in base 2, see kd_vexp2
  const Vec neg_base_s(-kd::kd_exp_base(stats.student.max) * kLog2e);
  const Vec neg_base_t(-kd::kd_exp_base(stats.teacher.max) * kLog2e);
  const Vec factor_s(kd::kd_grad_factor(coef, stats.student.max, stats.student));
  const Vec factor_t(kd::kd_grad_factor(coef, stats.teacher.max, stats.teacher));
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
  if (stats.student.max == acc_t(0) && stats.teacher.max == acc_t(0)) {
    // Base 0 (the direct pass): the exact-product exp, as pass 1 computed it.
    auto exp_direct = [&](const Vec& x) { return kd_vexp2_product(x, scale2_v); };
    sweep(exp_direct, exp_direct);
  } else {
    sweep([&](const Vec& x) { return kd_vexp2(at::vec::fmadd(x, scale2_v, neg_base_s)); },
          [&](const Vec& x) { return kd_vexp2(at::vec::fmadd(x, scale2_v, neg_base_t)); });
  }
}

template <typename scalar_t>
inline void fill_head(scalar_t* grad, int64_t num_classes, typename KDAcc<scalar_t>::type value) {
  std::fill(grad, grad + num_classes, static_cast<scalar_t>(value));
}

// Flush-to-zero and denormals-are-zero while a thread runs the kernel: a
// gradient element or A-term product below 1.2e-38 would otherwise be
// computed by a ~150-cycle microcode assist each (heads with confident
// teachers produce many); flushed to 0 it changes nothing measurable. The
// caller's MXCSR is restored on exit.
class FlushDenormalsGuard {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormalsGuard() : saved_(_mm_getcsr()) {
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
  }
  ~FlushDenormalsGuard() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

template <typename scalar_t>
void kd_kernel_typed(const KDCpuArgs& args) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;

  const int64_t batch = args.student.size(0);
  const int64_t total_classes = args.student.size(1);
  const int64_t num_heads = args.num_heads;
  const int64_t* offsets = args.head_offsets;
  const scalar_t* student = args.student.const_data_ptr<scalar_t>();
  const scalar_t* teacher = args.teacher.const_data_ptr<scalar_t>();
  scalar_t* grad = args.compute_grad ? args.grad.mutable_data_ptr<scalar_t>() : nullptr;

  int64_t widest_head = 0;
  for (int64_t h = 0; h < num_heads; ++h) {
    widest_head = std::max(widest_head, offsets[h + 1] - offsets[h]);
  }

  // Exp cache (pass 2 without exps): per thread, the exps of student and
  // teacher of one head plus one max per tile. A head uses it when its cache
  // fits a share of kScratchFractionOfGrad of the gradient's bytes; so the
  // whole scratch, over all threads, stays within that fraction.
  const int64_t num_threads = std::max<int64_t>(1, at::get_num_threads());
  const double grad_bytes = static_cast<double>(batch) * total_classes * sizeof(scalar_t);
  const double budget_elems_per_thread =
      kScratchFractionOfGrad * grad_bytes / sizeof(acc_t) / static_cast<double>(num_threads);
  auto cache_elems = [](int64_t classes) {
    return 2 * round_up(classes, Io::kBlock) + 2 * ((classes + kTile - 1) / kTile);
  };
  int64_t cached_limit = 0;  // widest head that uses the cache
  if (args.compute_grad) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t classes = offsets[h + 1] - offsets[h];
      if (static_cast<double>(cache_elems(classes)) <= budget_elems_per_thread) {
        cached_limit = std::max(cached_limit, classes);
      }
    }
  }
  const int64_t scratch_stride = cached_limit > 0 ? round_up(cache_elems(cached_limit), 64) : 0;
  at::Tensor scratch;
  acc_t* scratch_base = nullptr;
  if (scratch_stride > 0) {
    scratch = at::empty({num_threads, scratch_stride}, args.student.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    scratch_base = scratch.mutable_data_ptr<acc_t>();
  }

  at::Tensor task_losses = at::empty({batch, num_heads}, args.loss.options());
  acc_t* task_loss = task_losses.mutable_data_ptr<acc_t>();
  const acc_t grad_scale = static_cast<acc_t>(args.grad_scale);

  const int64_t num_tasks = batch * num_heads;
  const int64_t classes_per_task = std::max<int64_t>(1, total_classes / num_heads);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerChunk / classes_per_task);

  at::parallel_for(0, num_tasks, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormalsGuard flush_denormals;
    acc_t* thread_scratch = nullptr;
    if (scratch_base != nullptr) {
      const int64_t tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid >= 0 && tid < num_threads, "rcfast: thread id ", tid, " out of range");
      thread_scratch = scratch_base + tid * scratch_stride;
    }
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / num_heads;
      const int64_t head = task - row * num_heads;
      const int64_t first = offsets[head];
      const int64_t classes = offsets[head + 1] - first;
      const acc_t tau = static_cast<acc_t>(args.temperatures[head]);
      const acc_t weight = static_cast<acc_t>(args.weights[head]);
      const acc_t inv_tau = acc_t(1) / tau;
      const scalar_t* s = student + row * total_classes + first;
      const scalar_t* t = teacher + row * total_classes + first;

      const bool use_cache = thread_scratch != nullptr && classes <= cached_limit;
      acc_t* exp_s = nullptr;
      acc_t* exp_t = nullptr;
      acc_t* tile_max_s = nullptr;
      acc_t* tile_max_t = nullptr;
      KDHeadStats<acc_t> stats;
      if (use_cache) {
        const int64_t padded = round_up(classes, Io::kBlock);
        const int64_t num_tiles = (classes + kTile - 1) / kTile;
        exp_s = thread_scratch;
        exp_t = exp_s + padded;
        tile_max_s = exp_t + padded;
        tile_max_t = tile_max_s + num_tiles;
        if (!kd_head_pass1_direct<scalar_t, true>(s, t, classes, inv_tau, exp_s, exp_t, tile_max_s, tile_max_t,
                                                  stats)) {
          stats = kd_head_pass1_online<scalar_t, true>(s, t, classes, inv_tau, exp_s, exp_t, tile_max_s, tile_max_t);
        }
      } else if (!kd_head_pass1_direct<scalar_t, false>(s, t, classes, inv_tau, nullptr, nullptr, nullptr, nullptr,
                                                         stats)) {
        stats = kd_head_pass1_online<scalar_t, false>(s, t, classes, inv_tau, nullptr, nullptr, nullptr, nullptr);
      }
      const acc_t kl = kd::kd_finalize_kl(stats.student, stats.teacher, stats.a_term);
      task_loss[task] = weight * tau * tau * kl;

      if (grad != nullptr) {
        scalar_t* g = grad + row * total_classes + first;
        const acc_t coef = grad_scale * weight * tau;
        if (kd::kd_isnan(kl)) {
          fill_head(g, classes, std::numeric_limits<acc_t>::quiet_NaN());  // NaN in, NaN out
        } else if (stats.teacher.max == kd::kd_neg_inf<acc_t>()) {
          fill_head(g, classes, acc_t(0));  // fully masked head: no loss, no gradient
        } else if (use_cache) {
          kd_head_pass2_cached<scalar_t>(g, classes, stats, coef, exp_s, exp_t, tile_max_s, tile_max_t);
        } else {
          kd_head_pass2_recompute<scalar_t>(s, t, g, classes, inv_tau, stats, coef);
        }
      }
    }
  });

  // Reduction in a fixed order (independent of the thread count).
  acc_t* loss = args.loss.mutable_data_ptr<acc_t>();
  if (args.reduction == 0) {  // none: per-row sum over heads, in head order
    for (int64_t row = 0; row < batch; ++row) {
      acc_t row_loss = task_loss[row * num_heads];
      for (int64_t head = 1; head < num_heads; ++head) {
        row_loss += task_loss[row * num_heads + head];
      }
      loss[row] = row_loss;
    }
  } else {
    double total = 0.0;
    for (int64_t task = 0; task < num_tasks; ++task) {
      total += static_cast<double>(task_loss[task]);
    }
    if (args.reduction == 3) {
      total /= static_cast<double>(batch);
    } else if (args.reduction == 2) {
      total /= static_cast<double>(batch) * static_cast<double>(num_heads);
    }
    loss[0] = static_cast<acc_t>(total);
  }
}

}  // namespace

void multihead_kd_cpu_kernel(const KDCpuArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.student.scalar_type(), "rcfast_multihead_kd_cpu",
                                  [&] { kd_kernel_typed<scalar_t>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rcfast
