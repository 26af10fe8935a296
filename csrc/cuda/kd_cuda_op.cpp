// kd_cuda_op.cpp — the CUDA implementation of rcfast::multihead_kd_fwd: input
// checks, output allocation, the launch on the current stream, and the
// reduction of per-(row, head) losses. Built only when torch has CUDA
// (build_ext.py); the kernel itself is kd_loss_cuda.cu, behind a C interface.
//
// No host synchronisation: head_offsets/temperatures/weights stay on the
// device and are validated by the Python front-end (rcfast/ops/multihead_kd.py),
// which builds them; here only their shapes and dtypes are checked.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../kd_math.h"
#include "kd_loss_cuda.h"

namespace rcfast {
namespace cuda {
namespace {

constexpr const char* kOp = "rcfast::multihead_kd_fwd (cuda): ";

KDDtype to_kd_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return KDDtype::kFloat32;
    case at::kHalf:
      return KDDtype::kFloat16;
    case at::kBFloat16:
      return KDDtype::kBFloat16;
    default:
      TORCH_CHECK(false, kOp, "student must be float32, float16 or bfloat16, got ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor> multihead_kd_fwd_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                         const at::Tensor& head_offsets,
                                                         const at::Tensor& temperatures,
                                                         const at::Tensor& weights, int64_t reduction,
                                                         bool compute_grad) {
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device() &&
                  head_offsets.device() == student.device() && temperatures.device() == student.device() &&
                  weights.device() == student.device(),
              kOp, "all tensors must be on the same CUDA device");
  TORCH_CHECK(student.dim() == 2, kOp, "student must be 2-D [B, N]");
  TORCH_CHECK(teacher.sizes() == student.sizes(), kOp, "teacher shape ", teacher.sizes(),
              " must match student shape ", student.sizes());
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), kOp, "teacher dtype must match student dtype");
  TORCH_CHECK(head_offsets.dim() == 1 && head_offsets.scalar_type() == at::kLong && head_offsets.size(0) >= 2,
              kOp, "head_offsets must be int64 [H + 1] with H >= 1");
  const int64_t num_heads = head_offsets.size(0) - 1;
  TORCH_CHECK(temperatures.dim() == 1 && temperatures.size(0) == num_heads &&
                  temperatures.scalar_type() == at::kFloat,
              kOp, "temperatures must be float32 [H]");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == num_heads && weights.scalar_type() == at::kFloat, kOp,
              "weights must be float32 [H]");
  TORCH_CHECK(kd::kd_is_reduction(reduction), kOp, "reduction must be 0..3, got ", reduction);
  const auto reduction_kind = static_cast<kd::KDReduction>(reduction);
  const int64_t batch = student.size(0);
  TORCH_CHECK(batch > 0, kOp, "batch size must be > 0");

  const c10::cuda::CUDAGuard device_guard(student.device());
  const at::Tensor student_c = student.contiguous();
  const at::Tensor teacher_c = teacher.contiguous();
  const at::Tensor offsets_c = head_offsets.contiguous();
  const at::Tensor temperatures_c = temperatures.contiguous();
  const at::Tensor weights_c = weights.contiguous();

  const double grad_scale = kd::kd_reduction_scale(reduction_kind, batch, num_heads);

  at::Tensor head_loss = at::empty({batch, num_heads}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty_like(student_c) : at::empty({0}, student.options());

  KDCudaArgs args{to_kd_dtype(student.scalar_type()),
                  student_c.const_data_ptr(),
                  teacher_c.const_data_ptr(),
                  compute_grad ? grad.mutable_data_ptr() : nullptr,
                  head_loss.mutable_data_ptr<float>(),
                  offsets_c.const_data_ptr<int64_t>(),
                  temperatures_c.const_data_ptr<float>(),
                  weights_c.const_data_ptr<float>(),
                  batch,
                  student.size(1),
                  num_heads,
                  static_cast<float>(grad_scale)};
  const cudaError_t status = launch_multihead_kd_forward(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(status));

  // Per-row sums in a fixed order (deterministic), then the reduction's scale.
  at::Tensor rows = at::sum(head_loss, {1});
  at::Tensor loss = reduction_kind == kd::KDReduction::kNone ? rows : at::sum(rows).mul_(grad_scale);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcfast, CUDA, m) {
  m.impl("multihead_kd_fwd", &multihead_kd_fwd_cuda);
}

}  // namespace cuda
}  // namespace rcfast
