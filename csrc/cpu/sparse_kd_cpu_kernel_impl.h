// sparse_kd_cpu_kernel_impl.h — the vectorised CPU kernel of
// rcfast::sparse_multihead_kd_fwd (the KD loss against a top-k teacher).
//
// Kernel body, compiled once per CPU capability inside namespace
// rcfast::cpu::<CPU_CAPABILITY>, in the same translation units as the dense
// kernel (kd_cpu_kernel_{default,avx2,avx512}.cpp include this header after
// kd_cpu_kernel_impl.h): it reuses the dense kernel's vector exp (kd_vexp2*),
// loads/stores (KDIo), reductions, tiling constants and denormal guard, and
// the row math of kd_math.h, so both kernels compute exps, -inf and NaN alike.
//
// One task per (row, head), h's classes [o_h, o_h + C):
//   teacher  the k entries (contiguous values and indices): running max, the
//            sum l_t of exp(v/tau - m_t) and A = sum exp(v/tau - m_t) (v - s[idx]) / tau,
//            gathering the student at the entries; -inf values are padding
//            and their indices are not read; an index of a real entry outside
//            [0, C) throws (ValueError naming teacher_indices).
//   student  one streaming pass over the C logits for max and sum-exp (the
//            direct sweep relative to 0 when the sums allow it, else tiles with
//            an online max — as the dense kernel), storing the exps in a
//            per-thread cache when it fits the memory budget.
//   loss     KL = A / l_t - lse_t + lse_s (kd_finalize_kl).
//   gradient coef * softmax(s/tau) over the head, from the cached exps (or
//            recomputed), then overwritten at the k entries by
//            coef * (softmax(s/tau)[idx] - P), computed in float and rounded
//            once. P is the entry's p, or, when an index repeats in the
//            (row, head) (found with a per-thread bitmap of the head's
//            classes), the sum of p over the entries sharing it, so that the
//            gradient is always that of the loss computed.
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

// Where the student pass leaves its exps for the gradient: exp(x - base) by
// class (rounded up to whole blocks) and, per kTile tile, the running max
// they are relative to. Null pointers: no cache.
template <typename acc_t>
struct StudentExpCache {
  acc_t* exps;
  acc_t* tile_max;
};

// Student pass in one sweep with exps relative to 0 (no max needed): valid
// when the sum is finite and not tiny (see kDirectMinSum); otherwise returns
// false (large logits, NaN) and the caller runs student_pass_online.
template <typename scalar_t, bool kStoreExps>
inline bool student_pass_direct(const scalar_t* logits, int64_t num_classes, typename KDAcc<scalar_t>::type inv_tau,
                                StudentExpCache<typename KDAcc<scalar_t>::type> cache,
                                KDSoftmaxState<typename KDAcc<scalar_t>::type>& state) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec scale2_v(inv_tau * static_cast<acc_t>(1.4426950408889634));
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
  const acc_t sum = hsum(sum0 + sum1);
  if (!(std::isfinite(sum) && sum >= static_cast<acc_t>(kDirectMinSum))) return false;
  state = {acc_t(0), sum};
  if constexpr (kStoreExps) {
    std::fill(cache.tile_max, cache.tile_max + (num_classes + kTile - 1) / kTile, acc_t(0));
  }
  return true;
}

// Student pass, the general algorithm: per kTile tile, the tile's max of the
// raw logits (NaN caught by a probe sum, as in the dense kernel) merged into
// the running state, then the exps relative to it.
template <typename scalar_t, bool kStoreExps>
inline KDSoftmaxState<typename KDAcc<scalar_t>::type> student_pass_online(
    const scalar_t* logits, int64_t num_classes, typename KDAcc<scalar_t>::type inv_tau,
    StudentExpCache<typename KDAcc<scalar_t>::type> cache) {
  using Io = KDIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  constexpr int64_t W = Io::kWidth;
  const Vec neg_inf(kd::kd_neg_inf<acc_t>());
  const acc_t kLog2e = static_cast<acc_t>(1.4426950408889634);
  const Vec scale2_v(inv_tau * kLog2e);
  const Vec nan_probe_scale(static_cast<acc_t>(7.888609052210118e-31));  // 2^-100

  KDSoftmaxState<acc_t> state = kd::kd_softmax_state_init<acc_t>();
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
    acc_t tile_max = hmax(at::vec::clamp_min(max0, max1)) * inv_tau;
    if (kd::kd_isnan(hsum(probe))) tile_max = std::numeric_limits<acc_t>::quiet_NaN();
    kd::kd_merge_block_max(state, tile_max);
    if constexpr (kStoreExps) cache.tile_max[tile] = state.max;

    const Vec neg_base(-kd::kd_exp_base(state.max) * kLog2e);
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

// coef * softmax(x) over the head into grad: from the cached exps (one
// multiplier per tile), or recomputed from the logits.
template <typename scalar_t>
inline void write_student_softmax(const scalar_t* logits, scalar_t* grad, int64_t num_classes,
                                  typename KDAcc<scalar_t>::type inv_tau,
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
      const Vec factor(kd::kd_grad_factor(coef, cache.tile_max[tile], state));
      for (int64_t j = 0; j < n; j += Io::kBlock) {
        const acc_t* e = cache.exps + j0 + j;
        Io::store_block(grad + j0 + j, std::min<int64_t>(Io::kBlock, n - j), Vec::loadu(e) * factor,
                        Vec::loadu(e + W) * factor);
      }
    }
    return;
  }
  const acc_t kLog2e = static_cast<acc_t>(1.4426950408889634);
  const Vec scale2_v(inv_tau * kLog2e);
  const Vec neg_base(-kd::kd_exp_base(state.max) * kLog2e);
  const Vec factor(kd::kd_grad_factor(coef, state.max, state));
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

// Per-thread buffers of one (row, head) task's teacher entries.
template <typename acc_t>
struct EntryScratch {
  acc_t* x_teacher;  // v / tau
  acc_t* x_student;  // s[idx] / tau (gathered)
  acc_t* mass;       // exp(v / tau - m_t), then p
  uint64_t* seen;    // bitmap over the widest head's classes, all zero between tasks
};

// The teacher side of one task: its softmax state and A, with each entry's
// v / tau, gathered s[idx] / tau and exp(v / tau - m_t) left in the scratch.
// Throws (c10::ValueError) at the first real entry whose index is out of range.
template <typename scalar_t, typename index_t>
inline void teacher_pass(const scalar_t* values, const index_t* indices, const scalar_t* student, int64_t k,
                         int64_t num_classes, typename KDAcc<scalar_t>::type inv_tau, int64_t row, int64_t head,
                         EntryScratch<typename KDAcc<scalar_t>::type> entries,
                         KDSoftmaxState<typename KDAcc<scalar_t>::type>& state,
                         typename KDAcc<scalar_t>::type& a_term) {
  using acc_t = typename KDAcc<scalar_t>::type;
  const acc_t neg_inf = kd::kd_neg_inf<acc_t>();
  acc_t max = neg_inf;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t x = static_cast<acc_t>(values[j]) * inv_tau;
    entries.x_teacher[j] = x;
    max = kd::kd_nanmax(max, x);
    if (x == neg_inf) continue;  // padding: its index is not read
    const int64_t index = static_cast<int64_t>(indices[j]);
    TORCH_CHECK_VALUE(index >= 0 && index < num_classes, "rcfast::sparse_multihead_kd_fwd (cpu): teacher_indices[",
                      row, ", ", head, ", ", j, "] = ", index, " is out of range: head ", head, " has ",
                      num_classes, " classes (indices are within the head; pad unused entries with a teacher "
                      "value of -inf)");
    entries.x_student[j] = static_cast<acc_t>(student[index]) * inv_tau;
  }
  const acc_t base = kd::kd_exp_base(max);
  acc_t sum = 0, a = 0;
  for (int64_t j = 0; j < k; ++j) {
    const acc_t x = entries.x_teacher[j];
    const acc_t e = x == neg_inf ? acc_t(0) : kd::kd_exp(x - base);
    entries.mass[j] = e;
    sum += e;
    if (x != neg_inf) a += kd::kd_a_term(e, x, entries.x_student[j]);
  }
  state = {max, sum};
  a_term = a;
}

// Overwrites the gradient at the k entries with coef * (q[idx] - P), q the
// student's softmax (lse_s = -inf: q = 0), P the teacher mass at idx.
template <typename scalar_t, typename index_t>
inline void write_entry_gradients(scalar_t* grad, const index_t* indices, int64_t k,
                                  typename KDAcc<scalar_t>::type coef, typename KDAcc<scalar_t>::type lse_student,
                                  typename KDAcc<scalar_t>::type teacher_sum,
                                  EntryScratch<typename KDAcc<scalar_t>::type> entries) {
  using acc_t = typename KDAcc<scalar_t>::type;
  const acc_t neg_inf = kd::kd_neg_inf<acc_t>();
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
    acc_t mass = entries.mass[j];
    if (repeated) {  // invalid input, but still the gradient of the loss computed
      mass = 0;
      for (int64_t i = 0; i < k; ++i) {
        if (indices[i] == index && entries.x_teacher[i] != neg_inf) mass += entries.mass[i];
      }
    }
    const acc_t q = lse_student == neg_inf ? acc_t(0) : kd::kd_exp(entries.x_student[j] - lse_student);
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

  // Per-thread scratch: the entries (3 k), and the student's exp cache for
  // heads whose cache fits the dense kernel's budget (a share of
  // kScratchFractionOfGrad of the gradient's bytes per thread).
  const int64_t num_threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t entry_stride = round_up(k, 16);
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
  const int64_t scratch_stride = round_up(3 * entry_stride + (cached_limit > 0 ? cache_elems(cached_limit) : 0), 64);
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor scratch = at::empty({num_threads, scratch_stride}, args.student.options().dtype(acc_dtype));
  // One bit per class of the widest head and thread (repeated-index detection).
  const int64_t bitmap_words = args.compute_grad ? (widest_head + 63) / 64 : 0;
  at::Tensor bitmaps = at::zeros({num_threads, std::max<int64_t>(bitmap_words, 1)},
                                 args.student.options().dtype(at::kLong));
  acc_t* scratch_base = scratch.mutable_data_ptr<acc_t>();
  uint64_t* bitmap_base = reinterpret_cast<uint64_t*>(bitmaps.mutable_data_ptr<int64_t>());
  const acc_t grad_scale = static_cast<acc_t>(args.grad_scale);

  const int64_t num_tasks = batch * num_heads;
  const int64_t classes_per_task = std::max<int64_t>(1, total_classes / num_heads);
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerChunk / (classes_per_task + 4 * k));

  at::parallel_for(0, num_tasks, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormalsGuard flush_denormals;
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < num_threads, "rcfast: thread id ", tid, " out of range");
    acc_t* thread_scratch = scratch_base + tid * scratch_stride;
    const EntryScratch<acc_t> entries{thread_scratch, thread_scratch + entry_stride,
                                      thread_scratch + 2 * entry_stride, bitmap_base + tid * std::max<int64_t>(bitmap_words, 1)};
    acc_t* cache_base = thread_scratch + 3 * entry_stride;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / num_heads;
      const int64_t head = task - row * num_heads;
      const int64_t first = offsets[head];
      const int64_t classes = offsets[head + 1] - first;
      const acc_t tau = static_cast<acc_t>(args.temperatures[head]);
      const acc_t weight = static_cast<acc_t>(args.weights[head]);
      const acc_t inv_tau = acc_t(1) / tau;
      const scalar_t* s = student + row * total_classes + first;

      KDSoftmaxState<acc_t> teacher;
      acc_t a_term;
      teacher_pass<scalar_t, index_t>(values + task * k, indices + task * k, s, k, classes, inv_tau, row, head,
                                      entries, teacher, a_term);

      StudentExpCache<acc_t> cache{nullptr, nullptr};
      if (grad != nullptr && classes <= cached_limit) {
        cache = {cache_base, cache_base + round_up(classes, Io::kBlock)};
      }
      KDSoftmaxState<acc_t> student_state;
      bool direct;
      if (cache.exps != nullptr) {
        direct = student_pass_direct<scalar_t, true>(s, classes, inv_tau, cache, student_state);
        if (!direct) student_state = student_pass_online<scalar_t, true>(s, classes, inv_tau, cache);
      } else {
        direct = student_pass_direct<scalar_t, false>(s, classes, inv_tau, cache, student_state);
        if (!direct) student_state = student_pass_online<scalar_t, false>(s, classes, inv_tau, cache);
      }
      const acc_t kl = kd::kd_finalize_kl(student_state, teacher, a_term);
      task_loss[task] = weight * tau * tau * kl;

      if (grad == nullptr) continue;
      scalar_t* g = grad + row * total_classes + first;
      const acc_t coef = grad_scale * weight * tau;
      if (kd::kd_isnan(kl)) {
        fill_head(g, classes, std::numeric_limits<acc_t>::quiet_NaN());  // NaN in, NaN out
      } else if (teacher.max == kd::kd_neg_inf<acc_t>()) {
        fill_head(g, classes, acc_t(0));  // padding only: no loss, no gradient
      } else {
        write_student_softmax<scalar_t>(s, g, classes, inv_tau, student_state, direct, coef, cache);
        write_entry_gradients<scalar_t, index_t>(g, indices + task * k, k, coef, kd::kd_lse(student_state),
                                                 teacher.sum, entries);
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
