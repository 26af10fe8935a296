// sparse_kd_cpu_kernel_impl.h — the vectorised CPU kernel of
// rcfast::sparse_multihead_kd_fwd (the KD loss against a top-k teacher).
//
// Kernel body, compiled once per CPU capability inside namespace
// rcfast::cpu::<CPU_CAPABILITY>, in the same objects as the dense kernel
// (kd_cpu_kernel_{default,avx2,avx512}.cpp include it after kd_cpu_driver.h).
// It is built on the dense kernel's pieces: the vector exp (kd_vec_exp.h),
// loads/stores, reductions, tiling and the direct pass's limits
// (kd_cpu_passes.h), the denormal guard (kd_cpu_driver.h), and the row math of
// kd_math.h — its units (logits, exps 2^((u - base) c) with c = log2(e) / tau),
// online states, and kd_head_loss, which turns a head's state into
// w tau^2 KL with every -inf/NaN/weight-0 rule. So both kernels compute the
// same function the same way; only where the teacher comes from differs.
//
// One task per (row, head), h's classes [o_h, o_h + C):
//   student  one streaming pass over the C logits for max and sum of exps
//            (the direct sweep relative to 0 when its sum allows, else tiles
//            with an online max), caching the exps per thread when the cache
//            fits the dense kernel's memory budget;
//   teacher  the k entries (contiguous values and indices), vectorised: max,
//            exps, sum, and the student gathered at the entries (an index of
//            a non-padding entry outside [0, C) throws a ValueError naming
//            teacher_indices; a padding entry's index is not read);
//   loss     the head's KDHeadState, its A term summed over the entries
//            (A / l_t = sum_j p_j ((v_j - b_t) - (s_j - b_s)), relative to the
//            maxima: no large terms cancel), then kd_head_loss;
//   gradient coef * softmax(s/tau) over the head (cached exps, or recomputed),
//            then at the entries coef * (q - P), computed in float and rounded
//            once. P is the entry's p or, when an index repeats in the
//            (row, head) (found with a per-thread bitmap of the widest head's
//            classes), the sum of p over the entries sharing it, so that the
//            gradient is always that of the loss computed.
// No dense teacher exists: the kernel reads B*N student values and k entries
// per (row, head) and writes B*N gradient values.
#pragma once

#include <ATen/ops/zeros.h>

#include "kd_cpu_driver.h"
#include "sparse_kd_cpu.h"

namespace rcfast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using kd::KDSoftmaxState;

// Calls body(x0, x1, j) for each block of kBlock values of [0, n), j the
// block's first index; the last, partial block is padded with -inf (exp 0).
// (The dense passes' for_each_block walks two tensors at once.)
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

// Where the student pass leaves its exps for the gradient: 2^((u - base) c)
// by class (rounded up to whole blocks) and, per kTile tile, the max they are
// relative to. Null pointers: no cache.
template <typename acc_t>
struct StudentExpCache {
  acc_t* exps;
  acc_t* tile_max;
};

// The student in one sweep with exps relative to 0 (no max needed): valid
// when the sum lies in [kDirectMinSum, kDirectMaxSum] (kd_cpu_passes.h); else
// false (large or very negative logits, NaN, +inf) and the caller runs
// student_pass_online.
template <typename scalar_t, bool kStoreExps>
inline bool student_pass_direct(const scalar_t* logits, int64_t num_classes, typename KDAcc<scalar_t>::type exp_scale,
                                StudentExpCache<typename KDAcc<scalar_t>::type> cache,
                                KDSoftmaxState<typename KDAcc<scalar_t>::type>& state) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec exp_scale_v(exp_scale);
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  for_each_logit_block(logits, num_classes, [&](const Vec& u0, const Vec& u1, int64_t j) {
    prefetch_ahead<scalar_t, Io::kBlock>(logits + j);
    const Vec e0 = kd_vexp2_product(u0, exp_scale_v), e1 = kd_vexp2_product(u1, exp_scale_v);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
    if constexpr (kStoreExps) {
      e0.store(cache.exps + j);
      e1.store(cache.exps + j + W);
    }
  });
  const acc_t sum = hsum(sum0 + sum1);  // NaN for a NaN logit (kd_vexp2_product keeps it)
  if (!(sum >= static_cast<acc_t>(kDirectMinSum) && sum <= static_cast<acc_t>(kDirectMaxSum))) return false;
  state = {acc_t(0), sum};
  if constexpr (kStoreExps) {
    std::fill(cache.tile_max, cache.tile_max + (num_classes + kTile - 1) / kTile, acc_t(0));
  }
  return true;
}

// The student, general algorithm: per kTile tile, its max merged into the
// running state (kd_rescale_factor), then its exps relative to it (the tile
// is in L1 by then). A NaN logit gives a NaN exp and sum, a +inf logit a +inf
// max and a NaN exp: both reach kd_head_loss as NaN.
template <typename scalar_t, bool kStoreExps>
inline KDSoftmaxState<typename KDAcc<scalar_t>::type> student_pass_online(
    const scalar_t* logits, int64_t num_classes, typename KDAcc<scalar_t>::type exp_scale,
    StudentExpCache<typename KDAcc<scalar_t>::type> cache) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec neg_inf(kd::kd_neg_inf<acc_t>());
  const Vec exp_scale_v(exp_scale);

  KDSoftmaxState<acc_t> state{kd::kd_neg_inf<acc_t>(), acc_t(0)};
  int64_t tile = 0;
  for (int64_t j0 = 0; j0 < num_classes; j0 += kTile, ++tile) {
    const int64_t n = std::min(kTile, num_classes - j0);
    const scalar_t* u_tile = logits + j0;
    Vec max0 = neg_inf, max1 = neg_inf;
    for_each_logit_block(u_tile, n, [&](const Vec& u0, const Vec& u1, int64_t) {
      max0 = at::vec::clamp_min(u0, max0);
      max1 = at::vec::clamp_min(u1, max1);
    });
    const acc_t new_max = kd::kd_nanmax(state.max, hmax(at::vec::clamp_min(max0, max1)));
    state.sum = kd::kd_rescale_sum(state.sum, kd::kd_rescale_factor(state.max, new_max, exp_scale));
    state.max = new_max;
    if constexpr (kStoreExps) cache.tile_max[tile] = new_max;

    const Vec base(kd::kd_exp_base(new_max));
    Vec sum0(acc_t(0)), sum1(acc_t(0));
    for_each_logit_block(u_tile, n, [&](const Vec& u0, const Vec& u1, int64_t j) {
      prefetch_ahead<scalar_t, Io::kBlock>(u_tile + j);
      const Vec e0 = kd_vexp2((u0 - base) * exp_scale_v), e1 = kd_vexp2((u1 - base) * exp_scale_v);
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
                                  typename KDAcc<scalar_t>::type exp_scale,
                                  const KDSoftmaxState<typename KDAcc<scalar_t>::type>& state, bool direct,
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
      const Vec factor(kd::kd_grad_factor(coef, cache.tile_max[tile], state, exp_scale));
      for (int64_t j = 0; j < n; j += Io::kBlock) {
        const acc_t* e = cache.exps + j0 + j;
        Io::store_block(grad + j0 + j, std::min<int64_t>(Io::kBlock, n - j), Vec::loadu(e) * factor,
                        Vec::loadu(e + W) * factor);
      }
    }
    return;
  }
  const Vec exp_scale_v(exp_scale);
  const Vec base(kd::kd_exp_base(state.max));
  const Vec factor(kd::kd_grad_factor(coef, state.max, state, exp_scale));
  auto sweep = [&](auto exp_of) {
    for_each_logit_block(logits, num_classes, [&](const Vec& u0, const Vec& u1, int64_t j) {
      prefetch_ahead<scalar_t, Io::kBlock>(logits + j);
      Io::store_block(grad + j, std::min<int64_t>(Io::kBlock, num_classes - j), exp_of(u0) * factor,
                      exp_of(u1) * factor);
    });
  };
  if (direct) {  // base 0: the exact-product exp, as the pass computed it
    sweep([&](const Vec& u) { return kd_vexp2_product(u, exp_scale_v); });
  } else {
    sweep([&](const Vec& u) { return kd_vexp2((u - base) * exp_scale_v); });
  }
}

// Per-thread buffers of one task's k teacher entries, each padded to whole
// blocks with -inf values (padding), as the vector loops read them.
template <typename acc_t>
struct EntryScratch {
  acc_t* values;   // v (the teacher's logits)
  acc_t* student;  // s[idx], gathered (0 for padding)
  acc_t* exps;     // 2^((v - b_t) c), later the gradient at the entry
  uint64_t* seen;  // bitmap over the widest head's classes, all zero between tasks
};

// Gathers the k entries of one task into the scratch: values and the student
// at their indices. Throws (c10::ValueError) at a non-padding entry whose
// index is out of range; returns whether a student -inf meets a finite
// teacher value (kd_student_inf: the KL is +inf).
template <typename scalar_t, typename index_t>
inline bool gather_entries(const scalar_t* values, const index_t* indices, const scalar_t* student, int64_t k,
                           int64_t padded_k, int64_t num_classes, int64_t row, int64_t head,
                           EntryScratch<typename KDAcc<scalar_t>::type> entries) {
  using acc_t = typename KDAcc<scalar_t>::type;
  const acc_t neg_inf = kd::kd_neg_inf<acc_t>();
  bool student_inf = false;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t v = static_cast<acc_t>(values[j]);
    entries.values[j] = v;
    if (v == neg_inf) {  // padding: its index is not read
      entries.student[j] = acc_t(0);
      continue;
    }
    const int64_t index = static_cast<int64_t>(indices[j]);
    TORCH_CHECK_VALUE(index >= 0 && index < num_classes, "rcfast::sparse_multihead_kd_fwd (cpu): teacher_indices[",
                      row, ", ", head, ", ", j, "] = ", index, " is out of range: head ", head, " has ",
                      num_classes, " classes (indices are within the head; pad unused entries with a teacher "
                      "value of -inf)");
    const acc_t s = static_cast<acc_t>(student[index]);
    entries.student[j] = s;
    student_inf |= kd::kd_student_inf(s, v);
  }
  std::fill(entries.values + k, entries.values + padded_k, neg_inf);
  std::fill(entries.student + k, entries.student + padded_k, acc_t(0));
  return student_inf;
}

// The teacher's softmax state over the gathered entries, with their exps
// 2^((v - b_t) c) left in the scratch.
template <typename acc_t>
inline KDSoftmaxState<acc_t> teacher_state(int64_t padded_k, acc_t exp_scale, EntryScratch<acc_t> entries) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec max_v(kd::kd_neg_inf<acc_t>());
  for (int64_t j = 0; j < padded_k; j += W) max_v = at::vec::clamp_min(Vec::loadu(entries.values + j), max_v);
  // A NaN value may be dropped by the vector max, but its exp is NaN, and so is the sum.
  const acc_t max = hmax(max_v);
  const Vec base(kd::kd_exp_base(max)), exp_scale_v(exp_scale);
  Vec sum_v(acc_t(0));
  for (int64_t j = 0; j < padded_k; j += W) {
    const Vec e = kd_vexp2((Vec::loadu(entries.values + j) - base) * exp_scale_v);
    e.store(entries.exps + j);
    sum_v = sum_v + e;
  }
  return {max, hsum(sum_v)};
}

// A of the head (kd_math.h) over the entries: sum_j e_j ((v_j - b_t) - (s_j - b_s)),
// times kATermScale, masked to 0 where e_j = 0 (padding, underflow).
template <typename acc_t>
inline acc_t entries_a_term(int64_t padded_k, acc_t base_teacher, acc_t base_student, EntryScratch<acc_t> entries) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec b_t(base_teacher), b_s(base_student), a_scale(static_cast<acc_t>(kd::kATermScale));
  Vec a_v(acc_t(0));
  for (int64_t j = 0; j < padded_k; j += W) {
    const Vec gap = (Vec::loadu(entries.values + j) - b_t) - (Vec::loadu(entries.student + j) - b_s);
    a_v = fmadd_where_positive(Vec::loadu(entries.exps + j), gap * a_scale, a_v);
  }
  return hsum(a_v);
}

// Overwrites the gradient at the entries with coef * (q - P) (q the student's
// softmax there, computed as the head's sweep did; P the teacher mass at the
// class), each rounded once.
template <typename scalar_t, typename index_t>
inline void write_entry_gradients(scalar_t* grad, const index_t* indices, int64_t k, int64_t padded_k,
                                  typename KDAcc<scalar_t>::type coef, typename KDAcc<scalar_t>::type exp_scale,
                                  const KDSoftmaxState<typename KDAcc<scalar_t>::type>& student, bool direct,
                                  const KDSoftmaxState<typename KDAcc<scalar_t>::type>& teacher,
                                  EntryScratch<typename KDAcc<scalar_t>::type> entries) {
  using acc_t = typename KDAcc<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t neg_inf = kd::kd_neg_inf<acc_t>();
  // q = 2^((s - b_s) c) / l_s (0 for a student with no mass), p = e / l_t.
  const Vec exp_scale_v(exp_scale), base_s(kd::kd_exp_base(student.max));
  const Vec q_scale(student.max == neg_inf ? acc_t(0) : coef / student.sum);
  const Vec p_scale(coef / teacher.sum);
  for (int64_t j = 0; j < padded_k; j += W) {
    const Vec s = Vec::loadu(entries.student + j);
    const Vec exp_s = direct ? kd_vexp2_product(s, exp_scale_v) : kd_vexp2((s - base_s) * exp_scale_v);
    // Kept as coef * p for now (the repeated-index merge needs it); the gradient below.
    const Vec coef_p = Vec::loadu(entries.exps + j) * p_scale;
    (exp_s * q_scale).store(entries.student + j);
    coef_p.store(entries.exps + j);
  }
  bool repeated = false;
  for (int64_t j = 0; j < k; ++j) {
    if (entries.values[j] == neg_inf) continue;
    const uint64_t index = static_cast<uint64_t>(indices[j]);
    const uint64_t bit = uint64_t(1) << (index & 63);
    repeated |= (entries.seen[index >> 6] & bit) != 0;
    entries.seen[index >> 6] |= bit;
  }
  for (int64_t j = 0; j < k; ++j) {
    if (entries.values[j] == neg_inf) continue;
    const index_t index = indices[j];
    entries.seen[static_cast<uint64_t>(index) >> 6] = 0;  // leave the bitmap clear for the next task
    acc_t coef_mass = entries.exps[j];
    if (repeated) {  // invalid input, but still the gradient of the loss computed
      coef_mass = 0;
      for (int64_t i = 0; i < k; ++i) {
        if (indices[i] == index && entries.values[i] != neg_inf) coef_mass += entries.exps[i];
      }
    }
    grad[index] = static_cast<scalar_t>(entries.student[j] - coef_mass);
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
  double* task_loss = args.task_losses.mutable_data_ptr<double>();

  int64_t widest_head = 0;
  for (int64_t h = 0; h < num_heads; ++h) widest_head = std::max(widest_head, offsets[h + 1] - offsets[h]);

  // Per thread: the entries (3 padded k), the student's exp cache for heads
  // whose cache fits the dense kernel's budget (a share of
  // kScratchFractionOfGrad of the gradient's bytes), and a bitmap of the
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
  const int64_t padded_k = round_up(k, Io::kBlock);
  const int64_t entry_elems = 3 * padded_k;
  const int64_t scratch_stride = round_up(entry_elems + (cached_limit > 0 ? cache_elems(cached_limit) : 0), 64);
  at::Tensor scratch = at::empty({num_threads, scratch_stride},
                                 args.student.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
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
    acc_t* thread_scratch = scratch.mutable_data_ptr<acc_t>() + tid * scratch_stride;
    const EntryScratch<acc_t> entries{thread_scratch, thread_scratch + padded_k, thread_scratch + 2 * padded_k,
                                      reinterpret_cast<uint64_t*>(bitmaps.mutable_data_ptr<int64_t>()) +
                                          tid * bitmap_words};
    acc_t* cache_base = thread_scratch + entry_elems;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / num_heads;
      const int64_t head = task - row * num_heads;
      const int64_t first = offsets[head];
      const int64_t classes = offsets[head + 1] - first;
      const double tau = args.temperatures[head];
      const double weight = args.weights[head];
      const acc_t exp_scale = static_cast<acc_t>(kd::kLog2e / tau);
      const acc_t coef = static_cast<acc_t>(grad_scale * weight * tau);
      const scalar_t* s = student + row * total_classes + first;

      KDHeadState<acc_t> state = kd::kd_head_state_init<acc_t>();
      state.student_inf = gather_entries<scalar_t, index_t>(values + task * k, indices + task * k, s, k, padded_k,
                                                            classes, row, head, entries)
                              ? acc_t(1)
                              : acc_t(0);
      state.teacher = teacher_state(padded_k, exp_scale, entries);

      StudentExpCache<acc_t> cache{nullptr, nullptr};
      if (grad != nullptr && classes <= cached_limit) cache = {cache_base, cache_base + round_up(classes, Io::kBlock)};
      // As the dense driver: the direct sweep is exact relative to the max only
      // for 2+ classes (a 1-class head has exactly 2^0 = 1: KL and gradient 0),
      // and its gradient multiplier needs coef >= 2^-60.
      const bool try_direct = classes >= 2 && (grad == nullptr || std::abs(coef) >= acc_t(kDirectMinCoef));
      bool direct = false;
      if (cache.exps != nullptr) {
        direct = try_direct && student_pass_direct<scalar_t, true>(s, classes, exp_scale, cache, state.student);
        if (!direct) state.student = student_pass_online<scalar_t, true>(s, classes, exp_scale, cache);
      } else {
        direct = try_direct && student_pass_direct<scalar_t, false>(s, classes, exp_scale, cache, state.student);
        if (!direct) state.student = student_pass_online<scalar_t, false>(s, classes, exp_scale, cache);
      }
      state.a_term = entries_a_term(padded_k, kd::kd_exp_base(state.teacher.max), kd::kd_exp_base(state.student.max),
                                    entries);
      const double loss = kd::kd_head_loss(state, tau, weight);
      task_loss[task] = loss;

      if (grad == nullptr) continue;
      scalar_t* g = grad + row * total_classes + first;
      if (kd::kd_isnan(loss)) {
        fill_head(g, classes, std::numeric_limits<double>::quiet_NaN());  // NaN in, NaN out
      } else if (state.teacher.max == kd::kd_neg_inf<acc_t>() || weight == 0.0) {
        fill_head(g, classes, 0.0);  // padding only, or a switched-off head: no gradient
      } else {
        write_student_softmax<scalar_t>(s, g, classes, exp_scale, state.student, direct, coef, cache);
        write_entry_gradients<scalar_t, index_t>(g, indices + task * k, k, padded_k, coef, exp_scale, state.student,
                                                 direct, state.teacher, entries);
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
