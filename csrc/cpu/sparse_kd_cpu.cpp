// sparse_kd_cpu.cpp — the CPU implementation of rcfast::sparse_multihead_kd_fwd
// (the KD loss against a top-k teacher): input checks (a second line of
// defence behind rcfast/ops/sparse_kd.py), output allocation, the call of the
// per-capability kernel copy (sparse_kd_cpu_kernel_impl.h) that the dense op
// runs on this machine, and the reduction of the per-(row, head) losses in a
// fixed order (results independent of the thread count).
//
// The schema is in csrc/bindings.cpp; the contract is
// rcfast/ops/sparse_contract.py.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "kd_cpu_op_checks.h"
#include "kd_math.h"
#include "sparse_kd_cpu.h"

namespace rcfast {
namespace cpu {
namespace {

constexpr const char* kOp = "rcfast::sparse_multihead_kd_fwd (cpu): ";

// The vector path of the dense op (rcfast::kd_cpu_capability: ATen's choice,
// honouring ATEN_CPU_CAPABILITY), so that both ops always run the same one.
void run_kernel(const SparseKDCpuArgs& args) {
  static const std::string capability = c10::Dispatcher::singleton()
                                            .findSchemaOrThrow("rcfast::kd_cpu_capability", "")
                                            .typed<std::string()>()
                                            .call();
#if defined(RCFAST_HAVE_CPU_AVX512)
  if (capability == "avx512") return AVX512::sparse_multihead_kd_cpu_kernel(args);
#endif
#if defined(RCFAST_HAVE_CPU_AVX2)
  if (capability == "avx2") return AVX2::sparse_multihead_kd_cpu_kernel(args);
#endif
  DEFAULT::sparse_multihead_kd_cpu_kernel(args);
}

std::tuple<at::Tensor, at::Tensor> sparse_multihead_kd_fwd_cpu(
    const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& head_offsets,
    const at::Tensor& temperatures, const at::Tensor& weights, int64_t reduction, bool compute_grad) {
  TORCH_CHECK(student.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu() &&
                  head_offsets.device().is_cpu() && temperatures.device().is_cpu() && weights.device().is_cpu(),
              kOp, "all tensors must be on the CPU");
  TORCH_CHECK(student.dim() == 2, kOp, "student must be 2-D [B, N], got ", student.dim(), " dims");
  TORCH_CHECK(is_supported_dtype(student.scalar_type()), kOp,
              "student must be float32, float64, bfloat16 or float16, got ", student.scalar_type());
  TORCH_CHECK(values.dim() == 3 && values.size(0) == student.size(0), kOp,
              "teacher_values must be [B, H, k] with B = ", student.size(0), ", got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == student.scalar_type(), kOp, "teacher_values dtype ", values.scalar_type(),
              " must match student dtype ", student.scalar_type());
  TORCH_CHECK(indices.sizes() == values.sizes(), kOp, "teacher_indices shape ", indices.sizes(),
              " must match teacher_values shape ", values.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, kOp,
              "teacher_indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(values.size(2) >= 1, kOp, "teacher_values needs k >= 1 entries per head");
  const int64_t batch = student.size(0);
  const int64_t total_classes = student.size(1);
  TORCH_CHECK(batch > 0, kOp, "batch size must be > 0");
  const auto reduction_kind = check_reduction(kOp, reduction);
  const HeadTables tables = check_head_tables(kOp, head_offsets, temperatures, weights, total_classes);
  const int64_t num_heads = tables.num_heads;
  TORCH_CHECK(values.size(1) == num_heads, kOp, "teacher_values must have H = ", num_heads,
              " heads (head_offsets), got ", values.size(1));
  const int64_t* offsets = tables.offsets;
  const float* taus = tables.taus;
  const float* head_weights = tables.weights;

  const auto loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor task_losses = at::empty({batch, num_heads}, student.options().dtype(at::kDouble));
  at::Tensor grad = compute_grad ? at::empty({batch, total_classes}, student.options())
                                 : at::empty({0}, student.options());
  const double grad_scale = kd::kd_reduction_scale(reduction_kind, batch, num_heads);
  run_kernel(SparseKDCpuArgs{student.contiguous(), values.contiguous(), indices.contiguous(), offsets, taus,
                             head_weights, num_heads, grad_scale, compute_grad, task_losses, grad});

  // Reduction in a fixed order, in double: per row over heads, then over rows.
  const double* per_task = task_losses.const_data_ptr<double>();
  at::Tensor row_losses = at::empty({batch}, student.options().dtype(at::kDouble));
  double* rows = row_losses.mutable_data_ptr<double>();
  double total = 0.0;
  for (int64_t row = 0; row < batch; ++row) {
    rows[row] = 0.0;
    for (int64_t head = 0; head < num_heads; ++head) rows[row] += per_task[row * num_heads + head];
    total += rows[row];
  }
  at::Tensor loss = reduction_kind == kd::KDReduction::kNone
                        ? row_losses.to(loss_dtype)
                        : at::scalar_tensor(total * grad_scale, student.options().dtype(loss_dtype));
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcfast, CPU, m) {
  m.impl("sparse_multihead_kd_fwd", &sparse_multihead_kd_fwd_cpu);
}

}  // namespace cpu
}  // namespace rcfast
