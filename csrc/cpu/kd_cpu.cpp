// kd_cpu.cpp — the CPU implementation of rcfast::multihead_kd_fwd: input
// checks (a second line of defence behind rcfast/ops/multihead_kd.py), output
// allocation, and the runtime choice between the per-capability kernel copies
// (kd_cpu_kernel_{default,avx2,avx512}.cpp), as ATen's DispatchStub does it.
// Also implements rcfast::kd_cpu_capability, which reports that choice.
//
// The schemas are defined in csrc/bindings.cpp (one TORCH_LIBRARY block);
// the contract (inputs, outputs, scaling) is rcfast/ops/kernel_contract.py.
//
// Exp accuracy and speed: see csrc/cpu/kd_vec_exp.h (an inline base-2 exp,
// 1.7e-7 relative error).
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kd_cpu.h"
#include "kd_math.h"

namespace rcfast {
namespace cpu {
namespace {

enum class KDCpuPath { kDefault, kAvx2, kAvx512 };

// Decided once per process from ATen's own choice, which honours the
// ATEN_CPU_CAPABILITY environment variable (default|avx2|avx512) and what the
// CPU supports. A copy we did not build (non-x86 hosts) is never chosen.
KDCpuPath chosen_path() {
  static const KDCpuPath path = [] {
    const std::string capability = at::get_cpu_capability();
#if defined(RCFAST_HAVE_CPU_AVX512)
    if (capability == "AVX512") return KDCpuPath::kAvx512;
#endif
#if defined(RCFAST_HAVE_CPU_AVX2)
    if (capability == "AVX512" || capability == "AVX2") return KDCpuPath::kAvx2;
#endif
    return KDCpuPath::kDefault;
  }();
  return path;
}

constexpr const char* kOp = "rcfast::multihead_kd_fwd (cpu): ";

// Ask Linux to back a large, freshly allocated (not yet touched) output with
// transparent huge pages where it is set to "madvise" (the common default).
// The gradient of a big step is new memory every time (the allocator returns
// such blocks to the OS), and first-touch page faults on 4 KiB pages cost more
// than the kernel itself: measured here for 512 MiB, 300 ms to fault in with
// 4 KiB pages vs 85 ms with huge pages (and writes to it later run 2x faster,
// with fewer TLB misses). Only whole 2 MiB pages inside the buffer are
// advised; a refusal (THP off, old kernel) is harmless, so the result is
// ignored.
void advise_huge_pages(const at::Tensor& tensor) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  const size_t nbytes = tensor.numel() * tensor.element_size();
  if (nbytes < 2 * kHugePage) return;
  const auto begin = reinterpret_cast<uintptr_t>(tensor.const_data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + nbytes) & ~(kHugePage - 1);
  if (last > first) {
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)tensor;
#endif
}

bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

std::tuple<at::Tensor, at::Tensor> multihead_kd_fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& head_offsets,
                                                        const at::Tensor& temperatures,
                                                        const at::Tensor& weights, int64_t reduction,
                                                        bool compute_grad) {
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && head_offsets.device().is_cpu() &&
                  temperatures.device().is_cpu() && weights.device().is_cpu(),
              kOp, "all tensors must be on the CPU");
  TORCH_CHECK(student.dim() == 2, kOp, "student must be 2-D [B, N], got ", student.dim(), " dims");
  TORCH_CHECK(teacher.sizes() == student.sizes(), kOp, "teacher shape ", teacher.sizes(),
              " must match student shape ", student.sizes());
  TORCH_CHECK(is_supported_dtype(student.scalar_type()), kOp,
              "student must be float32, float64, bfloat16 or float16, got ", student.scalar_type());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), kOp, "teacher dtype ", teacher.scalar_type(),
              " must match student dtype ", student.scalar_type());
  const int64_t batch = student.size(0);
  const int64_t total_classes = student.size(1);
  TORCH_CHECK(batch > 0, kOp, "batch size must be > 0");
  TORCH_CHECK(kd::kd_is_reduction(reduction), kOp,
              "reduction must be 0 (none), 1 (sum), 2 (mean) or 3 (batchmean), got ", reduction);
  const auto reduction_kind = static_cast<kd::KDReduction>(reduction);

  TORCH_CHECK(head_offsets.dim() == 1 && head_offsets.scalar_type() == at::kLong, kOp,
              "head_offsets must be a 1-D int64 tensor [H + 1], got ", head_offsets.scalar_type(), " with ",
              head_offsets.dim(), " dims");
  const int64_t num_heads = head_offsets.size(0) - 1;
  TORCH_CHECK(num_heads >= 1, kOp, "head_offsets must hold at least 2 values (one head)");
  TORCH_CHECK(temperatures.dim() == 1 && temperatures.size(0) == num_heads &&
                  temperatures.scalar_type() == at::kFloat,
              kOp, "temperatures must be float32 [H] with H = ", num_heads, ", got ", temperatures.scalar_type(),
              " of shape ", temperatures.sizes());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == num_heads && weights.scalar_type() == at::kFloat, kOp,
              "weights must be float32 [H] with H = ", num_heads, ", got ", weights.scalar_type(), " of shape ",
              weights.sizes());

  const at::Tensor offsets_c = head_offsets.contiguous();
  const at::Tensor temperatures_c = temperatures.contiguous();
  const at::Tensor weights_c = weights.contiguous();
  const int64_t* offsets = offsets_c.const_data_ptr<int64_t>();
  const float* taus = temperatures_c.const_data_ptr<float>();
  const float* head_weights = weights_c.const_data_ptr<float>();
  TORCH_CHECK(offsets[0] == 0, kOp, "head_offsets must start at 0, got ", offsets[0]);
  for (int64_t h = 0; h < num_heads; ++h) {
    TORCH_CHECK(offsets[h + 1] > offsets[h], kOp, "head_offsets must be strictly increasing, got ", offsets[h],
                " then ", offsets[h + 1], " at head ", h);
    TORCH_CHECK(std::isfinite(taus[h]) && taus[h] > 0.0f, kOp, "temperatures must be finite and > 0, got ",
                taus[h], " for head ", h);
    TORCH_CHECK(std::isfinite(head_weights[h]), kOp, "weights must be finite, got ", head_weights[h],
                " for head ", h);
  }
  TORCH_CHECK(offsets[num_heads] == total_classes, kOp, "head_offsets must end at N = ", total_classes,
              " (the logits' columns), got ", offsets[num_heads]);

  // The front-end passes contiguous logits; other callers get a copy here.
  const at::Tensor student_c = student.contiguous();
  const at::Tensor teacher_c = teacher.contiguous();
  const auto loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = reduction_kind == kd::KDReduction::kNone ? at::empty({batch}, student.options().dtype(loss_dtype))
                                                              : at::empty({}, student.options().dtype(loss_dtype));
  at::Tensor grad = compute_grad ? at::empty({batch, total_classes}, student_c.options())
                                 : at::empty({0}, student.options());
  if (compute_grad) advise_huge_pages(grad);

  const KDCpuArgs args{student_c, teacher_c, offsets, taus, head_weights, num_heads,
                       reduction_kind, compute_grad, loss, grad};
  switch (chosen_path()) {
#if defined(RCFAST_HAVE_CPU_AVX512)
    case KDCpuPath::kAvx512:
      AVX512::multihead_kd_cpu_kernel(args);
      break;
#endif
#if defined(RCFAST_HAVE_CPU_AVX2)
    case KDCpuPath::kAvx2:
      AVX2::multihead_kd_cpu_kernel(args);
      break;
#endif
    default:
      DEFAULT::multihead_kd_cpu_kernel(args);
      break;
  }
  return {loss, grad};
}

std::string kd_cpu_capability() {
  switch (chosen_path()) {
    case KDCpuPath::kAvx512:
      return "avx512";
    case KDCpuPath::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(rcfast, CPU, m) {
  m.impl("multihead_kd_fwd", &multihead_kd_fwd_cpu);
}

// No tensor arguments, so no backend key to dispatch on: register for every key.
TORCH_LIBRARY_IMPL(rcfast, CompositeExplicitAutograd, m) {
  m.impl("kd_cpu_capability", &kd_cpu_capability);
}

}  // namespace cpu
}  // namespace rcfast
