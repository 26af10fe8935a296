// sparse_kd_cpu_kernel_impl.h — the vectorised CPU kernel of
// rcfast::sparse_multihead_kd_fwd (the KD loss against a top-k teacher).
//
// Kernel body, compiled once per CPU capability inside namespace
// rcfast::cpu::<CPU_CAPABILITY>, in the same translation units as the dense
// kernel (kd_cpu_kernel_{default,avx2,avx512}.cpp include this header after
// kd_cpu_kernel_impl.h): it reuses the dense kernel's vector exp (kd_vexp2*),
// loads/stores (KDIo), reductions, tiling constants and denormal guard, and
// the row math of kd_math.h (NaN-propagating max, exp bases, rescaling) and
// its -inf/NaN semantics.
//
// One task per (row, head), h's classes [o_h, o_h + C):
//   student  one streaming pass over the C logits for the softmax's max and
//            sum (the direct sweep relative to 0 when the sum allows it, else
//            tiles with an online max, as the dense kernel), storing the exps
//            in a per-thread cache when it fits the dense kernel's memory
//            budget. The state is kept in base 2: exps are
//            2^(s * scale2 - base2) with scale2 = log2(e) / tau, and base2 is
//            the exponent actually subtracted, so the loss, the cached and the
//            recomputed gradient and the entries' gradient all use the same
//            normalisation (a natural-log max would differ from it by up to an
//            ulp of s/tau * log2(e): 1e-3 relative for logits of 1e4).
//   teacher  the k entries (contiguous values and indices), in double: max
//            and l_t = sum exp(v/tau - m_t), gathering the student at the
//            entries; -inf values are padding and their indices are not read;
//            an index of a real entry outside [0, C) throws (ValueError
//            naming teacher_indices).
//   loss     KL = sum_j p_j (log p_j - log q_j) over the k entries, in double,
//            each log-probability relative to its own max (entries_kl): no
//            large terms cancel, even for logits near float's maximum.
//   gradient coef * softmax(s/tau) over the head (cached exps, or recomputed),
//            then overwritten at the k entries by coef * (softmax[idx] - P),
//            computed in double and rounded once. P is the entry's p or, when
//            an index repeats in the (row, head) (found with a per-thread
//            bitmap over the head's classes), the sum of p over the entries
//            sharing it, so that the gradient is always that of the loss.
// No dense teacher exists: the kernel reads B*N student values and k entries
// per (row, head) and writes B*N gradient values.
#pragma once

#include <ATen/ops/zeros.h>

#include "kd_cpu_kernel_impl.h"
#include "sparse_kd_cpu.h"

namespace rcfast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr double kLn2 = 0.6931471805599453;
// The direct sweep (exps relative to 0) is used when its sum lies in
// [2^-60, 2^64]: below, terms that matter were flushed (kDirectMinSum, as
// the dense kernel); above, coef / sum would fall near float's denormals,
// which the kernel flushes to 0 (a gradient that lost the mass of a logit
// with s/tau just below exp's overflow: issue 8, item 1).
constexpr double kDirectMaxSum = 18446744073709551616.0;  // 2^64

// Calls body(x0, x1, j) for each block of kBlock logits of [0, n), j the
// block's first class; the last, partial block is padded with -inf (exp 0).
template <typename scalar_t, typename Body>
inline void for_each_logit_block(const scalar_t* logits, int64_t n, Body&& body) {
  using Io = KDIo<scalar_t>;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  int64_t j = 0;
  for (; j + Io::kBlock <= n; j += Io::kBlock) {
    body(Io::load(logits + j), Io::load(logits + j + W), j);
  }
  if (j < n) {
    Vec x0, x1;
    Io::load_block_partial(logits + j, n - j, x0, x1);
    body(x0, x1, j);
  }
}

// The student's softmax normalisation in base 2: exps are
// 2^(s * scale2 - kd_exp_base(base2)), sum is their sum. base2 = -inf: no
// mass (yet); NaN: a NaN logit was seen.
template <typename acc_t>
struct Base2State {
  acc_t base2;
  acc_t sum;
};

// 2^(old - new) for sums relative to old, as kd_rescale_factor in base 2.
template <typename acc_t>
inline acc_t base2_rescale_factor(acc_t old_base, acc_t new_base) {
  if (old_base == new_base) return acc_t(1);
  if (old_base == kd::kd_neg_inf<acc_t>() && !kd::kd_isnan(new_base)) return acc_t(0);
  return std::exp2(old_base - new_base);
}

// coef * 2^(from - to) / sum: turns exps relative to base `from` into
// coef * softmax under the final state. 0 where nothing has mass.
template <typename acc_t>
inline acc_t base2_grad_factor(acc_t coef, acc_t from, const Base2State<acc_t>& final_state) {
  if (final_state.base2 == kd::kd_neg_inf<acc_t>() || from == kd::kd_neg_inf<acc_t>()) return acc_t(0);
  return coef * base2_rescale_factor(from, final_state.base2) / final_state.sum;
}

// Where the student pass leaves its exps for the gradient: 2^(s scale2 - base)
// by class (rounded up to whole blocks) and, per kTile tile, the base they
// are relative to. Null pointers: no cache.
template <typename acc_t>
struct StudentExpCache {
  acc_t* exps;
  acc_t* tile_base;
};

// Student pass in one sweep with exps relative to 0 (no max needed): valid
// when the sum lies in [kDirectMinSum, kDirectMaxSum]; otherwise returns
// false (large or very negative logits, NaN) and the caller runs
// student_pass_online.
template <typename scalar_t, bool kStoreExps>
inline bool student_pass_direct(const scalar_t* logits, int64_t num_classes, typename KDAcc<scalar_t>::type scale2,
                                StudentExpCache<typename KDAcc<scalar_t>::type> cache,
                                Base2State<typename KDAcc<scalar_t>::type>& state) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec scale2_v(scale2);
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  for_each_logit_block(logits, num_classes, [&](const Vec& x0, const Vec& x1, int64_t j) {
    prefetch_ahead<scalar_t, Io::kBlock>(logits + j);
    const Vec e0 = kd_vexp2_product(x0, scale2_v), e1 = kd_vexp2_product(x1, scale2_v);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
    if constexpr (kStoreExps) {
      e0.store(cache.exps + j);
      e1.store(cache.exps + j + W);
    }
  });
  const acc_t sum = hsum(sum0 + sum1);  // NaN when a logit is NaN (kd_vexp2_product keeps it)
  if (!(sum >= static_cast<acc_t>(kDirectMinSum) && sum <= static_cast<acc_t>(kDirectMaxSum))) return false;
  state = {acc_t(0), sum};
  if constexpr (kStoreExps) {
    std::fill(cache.tile_base, cache.tile_base + (num_classes + kTile - 1) / kTile, acc_t(0));
  }
  return true;
}

// Student pass, the general algorithm: per kTile tile, the tile's max of the
// raw logits (NaN caught by a probe sum, as in the dense kernel) times scale2
// merged into the running base, then the exps relative to it.
template <typename scalar_t, bool kStoreExps>
inline Base2State<typename KDAcc<scalar_t>::type> student_pass_online(
    const scalar_t* logits, int64_t num_classes, typename KDAcc<scalar_t>::type scale2,
    StudentExpCache<typename KDAcc<scalar_t>::type> cache) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec neg_inf(kd::kd_neg_inf<acc_t>());
  const Vec scale2_v(scale2);
  const Vec nan_probe_scale(static_cast<acc_t>(7.888609052210118e-31));  // 2^-100

  Base2State<acc_t> state{kd::kd_neg_inf<acc_t>(), acc_t(0)};
  int64_t tile = 0;
  for (int64_t j0 = 0; j0 < num_classes; j0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, num_classes - j0);
    const scalar_t* x_tile = logits + j0;
    Vec max0 = neg_inf, max1 = neg_inf, probe(acc_t(0));
    for_each_logit_block(x_tile, n, [&](const Vec& x0, const Vec& x1, int64_t) {
      max0 = at::vec::clamp_min(x0, max0);
      max1 = at::vec::clamp_min(x1, max1);
      probe = at::vec::fmadd(x0 + x1, nan_probe_scale, probe);
    });
    // scale2 > 0, so max(s) * scale2 is the max of s * scale2 (both rounded alike).
    acc_t tile_base = hmax(at::vec::clamp_min(max0, max1)) * scale2;
    if (kd::kd_isnan(hsum(probe))) tile_base = std::numeric_limits<acc_t>::quiet_NaN();
    const acc_t new_base = kd::kd_nanmax(state.base2, tile_base);
    state.sum = kd::kd_rescale_sum(state.sum, base2_rescale_factor(state.base2, new_base));
    state.base2 = new_base;
    if constexpr (kStoreExps) cache.tile_base[tile] = new_base;

    // fmadd: s * scale2 - base exactly, rounded once, so exps are relative to base itself.
    const Vec neg_base(-kd::kd_exp_base(new_base));
    Vec sum0(acc_t(0)), sum1(acc_t(0));
    for_each_logit_block(x_tile, n, [&](const Vec& x0, const Vec& x1, int64_t j) {
      prefetch_ahead<scalar_t, Io::kBlock>(x_tile + j);
      const Vec e0 = kd_vexp2(at::vec::fmadd(x0, scale2_v, neg_base));
      const Vec e1 = kd_vexp2(at::vec::fmadd(x1, scale2_v, neg_base));
      sum0 = sum0 + e0;
      sum1 = sum1 + e1;
      if constexpr (kStoreExps) {
        e0.store(cache.exps + j0 + j);
        e1.store(cache.exps + j0 + j + W);
      }
    });
    state.sum += hsum(sum0 + sum1);
  }
  return state;
}

// coef * softmax(s/tau) over the head into grad: from the cached exps (one
// multiplier per tile), or recomputed from the logits.
template <typename scalar_t>
inline void write_student_softmax(const scalar_t* logits, scalar_t* grad, int64_t num_classes,
                                  typename KDAcc<scalar_t>::type scale2,
                                  const Base2State<typename KDAcc<scalar_t>::type>& state, bool direct,
                                  typename KDAcc<scalar_t>::type coef,
                                  StudentExpCache<typename KDAcc<scalar_t>::type> cache) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  if (cache.exps != nullptr) {
    int64_t tile = 0;
    for (int64_t j0 = 0; j0 < num_classes; j0 += kTile, ++tile) {
      const int64_t n = std::min(kTile, num_classes - j0);
      const Vec factor(base2_grad_factor(coef, cache.tile_base[tile], state));
      for (int64_t j = 0; j < n; j += Io::kBlock) {
        const acc_t* e = cache.exps + j0 + j;
        Io::store_block(grad + j0 + j, std::min<int64_t>(Io::kBlock, n - j), Vec::loadu(e) * factor,
                        Vec::loadu(e + W) * factor);
      }
    }
    return;
  }
  const Vec scale2_v(scale2);
  const Vec neg_base(-kd::kd_exp_base(state.base2));
  const Vec factor(base2_grad_factor(coef, state.base2, state));
  auto sweep = [&](auto exp_of) {
    for_each_logit_block(logits, num_classes, [&](const Vec& x0, const Vec& x1, int64_t j) {
      prefetch_ahead<scalar_t, Io::kBlock>(logits + j);
      Io::store_block(grad + j, std::min<int64_t>(Io::kBlock, num_classes - j), exp_of(x0) * factor,
                      exp_of(x1) * factor);
    });
  };
  if (direct) {  // base 0: the exact-product exp, as the pass computed it
    sweep([&](const Vec& x) { return kd_vexp2_product(x, scale2_v); });
  } else {
    sweep([&](const Vec& x) { return kd_vexp2(at::vec::fmadd(x, scale2_v, neg_base)); });
  }
}

// Largest |base2| the vector passes handle. Their exps are
// 2^(fma(s, scale2, -base2)): the exact product minus the base, so every exp
// of a head carries the same factor 2^d, d = s_max * scale2 - base2 (the
// rounding error of the base), which cancels in the softmax and the sum. That
// holds while 2^d neither overflows nor underflows: |d| <= ulp(base2) / 2,
// at most 1 below 2^24, but 2^22 for logits of 1e30.
constexpr double kMaxVectorBase = 16777216.0;  // 2^24

// The student pass in double, one logit at a time, for the rare head whose
// base is beyond kMaxVectorBase (|s / tau| above about 1.2e7), where s * scale2
// is exact in double and the max element's exponent exactly 0.
template <typename scalar_t>
inline Base2State<double> student_pass_double(const scalar_t* logits, int64_t num_classes, double scale2) {
  double base = kd::kd_neg_inf<double>();
  for (int64_t j = 0; j < num_classes; ++j) base = kd::kd_nanmax(base, static_cast<double>(logits[j]) * scale2);
  const double shift = kd::kd_exp_base(base);
  double sum = 0;
  for (int64_t j = 0; j < num_classes; ++j) sum += std::exp2(static_cast<double>(logits[j]) * scale2 - shift);
  return {base, sum};
}

// coef * softmax(s/tau) from student_pass_double's state.
template <typename scalar_t>
inline void write_student_softmax_double(const scalar_t* logits, scalar_t* grad, int64_t num_classes, double scale2,
                                         const Base2State<double>& state, double coef) {
  const double factor = base2_grad_factor(coef, state.base2, state);
  const double shift = kd::kd_exp_base(state.base2);
  for (int64_t j = 0; j < num_classes; ++j) {
    grad[j] = static_cast<scalar_t>(std::exp2(static_cast<double>(logits[j]) * scale2 - shift) * factor);
  }
}

// Per-thread buffers of one task's teacher entries (double).
struct EntryScratch {
  double* x_teacher;      // v / tau
  double* y_student;      // s[idx] * scale2: the student's exponent, base 2
  double* mass;           // exp(v / tau - m_t), then p
  uint64_t* seen;         // bitmap over the widest head's classes, all zero between tasks
};

// The teacher side of one task, in double: the max and sum of its softmax;
// each entry's v / tau, exp(v / tau - m_t) and the student's exponent
// s[idx] * scale2 are left in the scratch. Throws (c10::ValueError) at a real
// entry whose index is out of range.
template <typename scalar_t, typename index_t>
inline kd::KDSoftmaxState<double> teacher_pass(const scalar_t* values, const index_t* indices, const scalar_t* student,
                                               int64_t k, int64_t num_classes, double tau, double scale2, int64_t row,
                                               int64_t head, EntryScratch entries) {
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  double max = neg_inf;
  for (int64_t j = 0; j < k; ++j) {
    const double x = static_cast<double>(values[j]) / tau;
    entries.x_teacher[j] = x;
    max = kd::kd_nanmax(max, x);
    if (x == neg_inf) continue;  // padding: its index is not read
    const int64_t index = static_cast<int64_t>(indices[j]);
    TORCH_CHECK_VALUE(index >= 0 && index < num_classes, "rcfast::sparse_multihead_kd_fwd (cpu): teacher_indices[",
                      row, ", ", head, ", ", j, "] = ", index, " is out of range: head ", head, " has ",
                      num_classes, " classes (indices are within the head; pad unused entries with a teacher "
                      "value of -inf)");
    entries.y_student[j] = static_cast<double>(student[index]) * scale2;
  }
  const double base = kd::kd_exp_base(max);
  double sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    const double x = entries.x_teacher[j];
    const double e = x == neg_inf ? 0.0 : std::exp(x - base);
    entries.mass[j] = e;
    sum += e;
  }
  return {max, sum};
}

// KL(p || q) of one task, with the semantics of kd_math.h: NaN in (student
// anywhere in the head, or a teacher value) gives NaN; a teacher of padding
// only adds 0; a student with no mass gives +inf. Otherwise
// sum_j p_j (log p_j - log q_j) over the entries, each log-probability taken
// relative to its own max, so nothing large cancels (the dense kernel's
// A / l_t - lse_t + lse_s loses all digits when one side's logits are huge).
inline double entries_kl(const Base2State<double>& student, const kd::KDSoftmaxState<double>& teacher, int64_t k,
                         EntryScratch entries) {
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  if (kd::kd_isnan(student.base2) || kd::kd_isnan(teacher.max)) return std::numeric_limits<double>::quiet_NaN();
  if (teacher.max == neg_inf) return 0.0;
  if (student.base2 == neg_inf) return std::numeric_limits<double>::infinity();
  const double log_teacher_sum = std::log(teacher.sum);
  const double log_student_sum = std::log(student.sum);
  double kl = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (!(entries.mass[j] > 0)) continue;  // p = 0 adds nothing, even against a student -inf
    const double log_p = (entries.x_teacher[j] - teacher.max) - log_teacher_sum;
    const double log_q = (entries.y_student[j] - student.base2) * kLn2 - log_student_sum;
    kl += entries.mass[j] / teacher.sum * (log_p - log_q);
  }
  return kl;
}

// Overwrites the gradient at the k entries with coef * (q[idx] - P), q the
// student's softmax in the state's own normalisation (0 when the student has
// no mass at all), P the teacher mass at idx, in double, rounded once.
template <typename scalar_t, typename index_t>
inline void write_entry_gradients(scalar_t* grad, const index_t* indices, int64_t k, double coef,
                                  double student_base2, double student_sum, double teacher_sum,
                                  EntryScratch entries) {
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  const bool student_empty = student_base2 == neg_inf;
  bool repeated = false;
  for (int64_t j = 0; j < k; ++j) {
    entries.mass[j] /= teacher_sum;  // e_j / l_t = p_j
    if (entries.x_teacher[j] == neg_inf) continue;
    const uint64_t index = static_cast<uint64_t>(indices[j]);
    const uint64_t bit = uint64_t(1) << (index & 63);
    repeated |= (entries.seen[index >> 6] & bit) != 0;
    entries.seen[index >> 6] |= bit;
  }
  for (int64_t j = 0; j < k; ++j) {
    if (entries.x_teacher[j] == neg_inf) continue;
    const index_t index = indices[j];
    entries.seen[static_cast<uint64_t>(index) >> 6] = 0;  // leave the bitmap clear for the next task
    double mass = entries.mass[j];
    if (repeated) {  // invalid input, but still the gradient of the loss computed
      mass = 0;
      for (int64_t i = 0; i < k; ++i) {
        if (indices[i] == index && entries.x_teacher[i] != neg_inf) mass += entries.mass[i];
      }
    }
    const double q = student_empty ? 0.0 : std::exp2(entries.y_student[j] - student_base2) / student_sum;
    grad[index] = static_cast<scalar_t>(coef * (q - mass));
  }
}

template <typename scalar_t, typename index_t>
void sparse_kd_kernel_typed(const SparseKDCpuArgs& args) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;

  const int64_t batch = args.student.size(0);
  const int64_t total_classes = args.student.size(1);
  const int64_t num_heads = args.num_heads;
  const int64_t k = args.values.size(2);
  const int64_t* offsets = args.head_offsets;
  const scalar_t* student = args.student.const_data_ptr<scalar_t>();
  const scalar_t* values = args.values.const_data_ptr<scalar_t>();
  const index_t* indices = args.indices.const_data_ptr<index_t>();
  scalar_t* grad = args.compute_grad ? args.grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* task_loss = args.task_losses.mutable_data_ptr<acc_t>();

  int64_t widest_head = 0;
  for (int64_t h = 0; h < num_heads; ++h) widest_head = std::max(widest_head, offsets[h + 1] - offsets[h]);

  // Per-thread scratch: the student's exp cache, for heads whose cache fits
  // the dense kernel's budget (a share of kScratchFractionOfGrad of the
  // gradient's bytes per thread); the entries (3 k doubles); a bitmap of the
  // widest head's classes (repeated-index detection).
  const int64_t num_threads = std::max<int64_t>(1, at::get_num_threads());
  const double budget_elems_per_thread = kScratchFractionOfGrad * static_cast<double>(batch) * total_classes *
                                         sizeof(scalar_t) / sizeof(acc_t) / static_cast<double>(num_threads);
  auto cache_elems = [](int64_t classes) { return round_up(classes, Io::kBlock) + (classes + kTile - 1) / kTile; };
  int64_t cached_limit = 0;  // widest head that uses the cache
  if (args.compute_grad) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t classes = offsets[h + 1] - offsets[h];
      if (static_cast<double>(cache_elems(classes)) <= budget_elems_per_thread) {
        cached_limit = std::max(cached_limit, classes);
      }
    }
  }
  const int64_t cache_stride = cached_limit > 0 ? round_up(cache_elems(cached_limit), 64) : 0;
  at::Tensor cache_scratch;
  if (cache_stride > 0) {
    cache_scratch = at::empty({num_threads, cache_stride},
                              args.student.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  const int64_t entry_stride = round_up(k, 8);
  at::Tensor entry_scratch = at::empty({num_threads, 3 * entry_stride}, args.student.options().dtype(at::kDouble));
  const int64_t bitmap_words = args.compute_grad ? (widest_head + 63) / 64 : 1;
  at::Tensor bitmaps = at::zeros({num_threads, bitmap_words}, args.student.options().dtype(at::kLong));

  const double grad_scale = args.grad_scale;
  const int64_t num_tasks = batch * num_heads;
  const int64_t classes_per_task = std::max<int64_t>(1, total_classes / num_heads);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerChunk / (classes_per_task + 4 * k));

  at::parallel_for(0, num_tasks, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormalsGuard flush_denormals;
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < num_threads, "rcfast: thread id ", tid, " out of range");
    double* entry_base = entry_scratch.mutable_data_ptr<double>() + tid * 3 * entry_stride;
    const EntryScratch entries{entry_base, entry_base + entry_stride, entry_base + 2 * entry_stride,
                               reinterpret_cast<uint64_t*>(bitmaps.mutable_data_ptr<int64_t>()) + tid * bitmap_words};
    acc_t* cache_base = cache_stride > 0 ? cache_scratch.mutable_data_ptr<acc_t>() + tid * cache_stride : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / num_heads;
      const int64_t head = task - row * num_heads;
      const int64_t first = offsets[head];
      const int64_t classes = offsets[head + 1] - first;
      const acc_t tau = static_cast<acc_t>(args.temperatures[head]);
      const acc_t weight = static_cast<acc_t>(args.weights[head]);
      const acc_t scale2 = static_cast<acc_t>(1.4426950408889634) / tau;  // exps in base 2
      const scalar_t* s = student + row * total_classes + first;

      const kd::KDSoftmaxState<double> teacher = teacher_pass<scalar_t, index_t>(
          values + task * k, indices + task * k, s, k, classes, tau, scale2, row, head, entries);

      StudentExpCache<acc_t> cache{nullptr, nullptr};
      if (grad != nullptr && classes <= cached_limit) cache = {cache_base, cache_base + round_up(classes, Io::kBlock)};
      Base2State<acc_t> student_state;
      bool direct;
      if (cache.exps != nullptr) {
        direct = student_pass_direct<scalar_t, true>(s, classes, scale2, cache, student_state);
        if (!direct) student_state = student_pass_online<scalar_t, true>(s, classes, scale2, cache);
      } else {
        direct = student_pass_direct<scalar_t, false>(s, classes, scale2, cache, student_state);
        if (!direct) student_state = student_pass_online<scalar_t, false>(s, classes, scale2, cache);
      }
      // Logits too large for the float exps (see kMaxVectorBase): the same pass in double.
      const bool needs_double = student_state.base2 == std::numeric_limits<acc_t>::infinity() ||
                              (std::isfinite(student_state.base2) &&
                               std::abs(static_cast<double>(student_state.base2)) >= kMaxVectorBase);
      const Base2State<double> student64 =
          needs_double ? student_pass_double(s, classes, static_cast<double>(scale2))
                     : Base2State<double>{static_cast<double>(student_state.base2), static_cast<double>(student_state.sum)};
      double kl = entries_kl(student64, teacher, k, entries);
      // A 1-class head: both softmaxes are exactly 1, so KL and gradient are
      // exactly 0 (the formula would leave the rounding of exp and log).
      const bool one_class = classes == 1 && std::isfinite(kl);
      if (one_class) kl = 0.0;
      task_loss[task] = static_cast<acc_t>(static_cast<double>(weight) * tau * tau * kl);

      if (grad == nullptr) continue;
      scalar_t* g = grad + row * total_classes + first;
      const acc_t coef = static_cast<acc_t>(grad_scale * weight * tau);
      if (kd::kd_isnan(kl)) {
        fill_head(g, classes, std::numeric_limits<acc_t>::quiet_NaN());  // NaN in, NaN out
      } else if (one_class || teacher.max == -std::numeric_limits<double>::infinity()) {
        fill_head(g, classes, acc_t(0));  // no loss to move (padding only, or one class)
      } else {
        if (needs_double) {
          write_student_softmax_double(s, g, classes, static_cast<double>(scale2), student64, static_cast<double>(coef));
        } else {
          write_student_softmax<scalar_t>(s, g, classes, scale2, student_state, direct, coef, cache);
        }
        write_entry_gradients<scalar_t, index_t>(g, indices + task * k, k, static_cast<double>(coef), student64.base2,
                                                 student64.sum, teacher.sum, entries);
      }
    }
  });
}

}  // namespace

void sparse_multihead_kd_cpu_kernel(const SparseKDCpuArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.student.scalar_type(), "rcfast_sparse_kd_cpu", [&] {
    if (args.indices.scalar_type() == at::kInt) {
      sparse_kd_kernel_typed<scalar_t, int32_t>(args);
    } else {
      sparse_kd_kernel_typed<scalar_t, int64_t>(args);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rcfast
