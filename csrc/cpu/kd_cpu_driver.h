// kd_cpu_driver.h — the CPU kernel of rcfast::multihead_kd_fwd: threads, the
// exp cache, the per-head choice of passes (kd_cpu_passes.h), the loss of each
// head (kd_math.h) and the reduction.
//
// Not compiled on its own: each of kd_cpu_kernel_{default,avx2,avx512}.cpp
// includes it after build_ext.py has defined CPU_CAPABILITY (and
// CPU_CAPABILITY_AVX2/AVX512 plus the matching -m flags), so at::vec is 16
// lanes of AVX-512, 8 of AVX2, or the portable fallback, and every copy lands
// in its own namespace rcfast::cpu::<CPU_CAPABILITY>. kd_cpu.cpp picks one at
// runtime, as ATen's DispatchStub does.
//
// One task per (row, head), in parallel. Pass 2's exp cache: when a
// thread-local scratch of 2 * C_h floats fits the memory budget (5% of the
// gradient, over all threads), pass 1 stores its exps there and pass 2 only
// rescales them; otherwise pass 2 re-reads the logits (wide heads, tiny
// batches). Per-(row, head) losses go to a [B, H] buffer of doubles and are
// reduced in a fixed order after the parallel loop, so results are bitwise
// identical for any thread count.
#pragma once

#ifndef CPU_CAPABILITY
#error "kd_cpu_driver.h is compiled by kd_cpu_kernel_<capability>.cpp with CPU_CAPABILITY defined"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../kd_math.h"
#include "kd_cpu.h"
#include "kd_cpu_passes.h"

namespace rcfast {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Parallel chunks get at least this many logits each (parallel_for grain), so
// tiny calls do not pay for waking the OpenMP team.
constexpr int64_t kMinElementsPerChunk = 32768;
// The exp cache may use at most this fraction of the gradient's size, split
// across the threads (tests/test_cpu_kernel.py measures it).
constexpr double kScratchFractionOfGrad = 0.05;

// Flush-to-zero and denormals-are-zero while a thread runs the kernel: a
// gradient element or A-term product below 1.2e-38 would otherwise be
// computed by a ~150-cycle microcode assist each (heads with confident
// teachers produce many); flushed to 0 it changes nothing measurable (the
// passes keep every multiplier they use a normal float). The caller's MXCSR is
// restored on exit.
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
inline void fill_head(scalar_t* grad, int64_t num_classes, double value) {
  std::fill(grad, grad + num_classes, static_cast<scalar_t>(value));
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
  const double grad_scale = kd::kd_reduction_scale(args.reduction, batch, num_heads);

  // The exp cache: per thread, the exps of student and teacher of one head plus
  // one max per tile. A head uses it when its cache fits a share of
  // kScratchFractionOfGrad of the gradient's bytes, so the whole scratch, over
  // all threads, stays within that fraction.
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
    scratch = at::empty({num_threads, scratch_stride},
                        args.student.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    scratch_base = scratch.mutable_data_ptr<acc_t>();
  }

  at::Tensor task_losses = at::empty({batch, num_heads}, args.loss.options().dtype(at::kDouble));
  double* task_loss = task_losses.mutable_data_ptr<double>();

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
      const double tau = args.temperatures[head];
      const double weight = args.weights[head];
      const acc_t exp_scale = static_cast<acc_t>(kd::kLog2e / tau);
      const acc_t coef = static_cast<acc_t>(grad_scale * weight * tau);
      const scalar_t* s = student + row * total_classes + first;
      const scalar_t* t = teacher + row * total_classes + first;

      const bool use_cache = thread_scratch != nullptr && classes <= cached_limit;
      KDExpCache<acc_t> cache{nullptr, nullptr, nullptr, nullptr};
      if (use_cache) {
        const int64_t padded = round_up(classes, Io::kBlock);
        cache.exp_student = thread_scratch;
        cache.exp_teacher = cache.exp_student + padded;
        cache.tile_max_student = cache.exp_teacher + padded;
        cache.tile_max_teacher = cache.tile_max_student + (classes + kTile - 1) / kTile;
      }
      // The direct pass is exact only relative to the max for 1-class heads
      // (2^0 = 1 there: KL and gradient exactly 0), and its gradient multiplier
      // needs coef >= 2^-60 (kd_cpu_passes.h).
      const bool try_direct = classes >= 2 && (grad == nullptr || std::abs(coef) >= acc_t(kDirectMinCoef));
      KDHeadState<acc_t> state = kd::kd_head_state_init<acc_t>();
      bool direct = false;
      if (use_cache) {
        direct = try_direct && kd_head_pass1_direct<scalar_t, true>(s, t, classes, exp_scale, cache, state);
        if (!direct) state = kd_head_pass1_online<scalar_t, true>(s, t, classes, exp_scale, cache);
      } else {
        direct = try_direct && kd_head_pass1_direct<scalar_t, false>(s, t, classes, exp_scale, cache, state);
        if (!direct) state = kd_head_pass1_online<scalar_t, false>(s, t, classes, exp_scale, cache);
      }
      const double loss = kd::kd_head_loss(state, tau, weight);
      task_loss[task] = loss;

      if (grad != nullptr) {
        scalar_t* g = grad + row * total_classes + first;
        if (kd::kd_isnan(loss)) {
          fill_head(g, classes, std::numeric_limits<double>::quiet_NaN());  // NaN in, NaN out
        } else if (state.teacher.max == kd::kd_neg_inf<acc_t>() || weight == 0.0) {
          fill_head(g, classes, 0.0);  // fully masked or switched-off head: no gradient
        } else if (use_cache) {
          kd_head_pass2_cached<scalar_t>(g, classes, state, coef, exp_scale, cache);
        } else {
          kd_head_pass2_recompute<scalar_t>(s, t, g, classes, state, coef, exp_scale);
        }
      }
    }
  });

  // Reduction in a fixed order (independent of the thread count), in double.
  acc_t* loss = args.loss.mutable_data_ptr<acc_t>();
  if (args.reduction == kd::KDReduction::kNone) {  // per-row sum over heads, in head order
    for (int64_t row = 0; row < batch; ++row) {
      double row_loss = 0.0;
      for (int64_t head = 0; head < num_heads; ++head) row_loss += task_loss[row * num_heads + head];
      loss[row] = static_cast<acc_t>(row_loss);
    }
  } else {
    double total = 0.0;
    for (int64_t task = 0; task < num_tasks; ++task) total += task_loss[task];
    loss[0] = static_cast<acc_t>(total * grad_scale);
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
