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

#include <cstdint>
#include <string>
#include <tuple>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kd_cpu.h"
#include "kd_cpu_op_checks.h"
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
  const auto reduction_kind = check_reduction(kOp, reduction);
  const HeadTables tables = check_head_tables(kOp, head_offsets, temperatures, weights, total_classes);
  const int64_t num_heads = tables.num_heads;
  const int64_t* offsets = tables.offsets;
  const float* taus = tables.taus;
  const float* head_weights = tables.weights;

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
