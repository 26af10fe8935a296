// sparse_kd_cuda_op.cpp — the CUDA implementation of
// rcfast::sparse_multihead_kd_fwd (the KD loss against a top-k teacher): input
// checks, output allocation, the launch on the current stream, and the
// reduction of per-(row, head) losses. Built only when torch has CUDA
// (build_ext.py); the kernel is sparse_kd_cuda.cu, behind a C interface.
//
// No host synchronisation: head_offsets/temperatures/weights stay on the
// device (built by rcfast/ops/sparse_kd.py); indices are range-checked by the
// kernel (a bad one makes its (row, head) NaN) or, on request, by the front
// end (validate=True).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../kd_math.h"
#include "sparse_kd_cuda.h"

namespace rcfast {
namespace cuda {
namespace {

constexpr const char* kOp = "rcfast::sparse_multihead_kd_fwd (cuda): ";

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

std::tuple<at::Tensor, at::Tensor> sparse_multihead_kd_fwd_cuda(
    const at::Tensor& student, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& head_offsets,
    const at::Tensor& temperatures, const at::Tensor& weights, int64_t reduction, bool compute_grad) {
  const auto device = student.device();
  TORCH_CHECK(student.is_cuda() && values.device() == device && indices.device() == device &&
                  head_offsets.device() == device && temperatures.device() == device && weights.device() == device,
              kOp, "all tensors must be on the same CUDA device");
  TORCH_CHECK(student.dim() == 2, kOp, "student must be 2-D [B, N]");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == student.size(0), kOp, "teacher_values must be [B, H, k]");
  TORCH_CHECK(values.scalar_type() == student.scalar_type(), kOp, "teacher_values dtype must match student dtype");
  TORCH_CHECK(indices.sizes() == values.sizes(), kOp, "teacher_indices must have teacher_values' shape");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, kOp,
              "teacher_indices must be int32 or int64");
  TORCH_CHECK(head_offsets.dim() == 1 && head_offsets.scalar_type() == at::kLong && head_offsets.size(0) >= 2,
              kOp, "head_offsets must be int64 [H + 1] with H >= 1");
  const int64_t num_heads = head_offsets.size(0) - 1;
  TORCH_CHECK(values.size(1) == num_heads, kOp, "teacher_values must have H = ", num_heads, " heads");
  TORCH_CHECK(temperatures.dim() == 1 && temperatures.size(0) == num_heads &&
                  temperatures.scalar_type() == at::kFloat,
              kOp, "temperatures must be float32 [H]");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == num_heads && weights.scalar_type() == at::kFloat, kOp,
              "weights must be float32 [H]");
  TORCH_CHECK(kd::kd_is_reduction(reduction), kOp, "reduction must be 0..3, got ", reduction);
  const auto reduction_kind = static_cast<kd::KDReduction>(reduction);
  const int64_t batch = student.size(0);
  TORCH_CHECK(batch > 0, kOp, "batch size must be > 0");

  const c10::cuda::CUDAGuard device_guard(device);
  const at::Tensor student_c = student.contiguous();
  const at::Tensor values_c = values.contiguous();
  const at::Tensor indices_c = indices.contiguous();
  const at::Tensor offsets_c = head_offsets.contiguous();
  const at::Tensor temperatures_c = temperatures.contiguous();
  const at::Tensor weights_c = weights.contiguous();
  const double grad_scale = kd::kd_reduction_scale(reduction_kind, batch, num_heads);

  at::Tensor head_loss = at::empty({batch, num_heads}, student.options().dtype(at::kFloat));
  at::Tensor grad = compute_grad ? at::empty({batch, student.size(1)}, student.options())
                                 : at::empty({0}, student.options());
  const SparseKDCudaArgs args{to_kd_dtype(student.scalar_type()),
                              indices.scalar_type() == at::kLong,
                              student_c.const_data_ptr(),
                              values_c.const_data_ptr(),
                              indices_c.const_data_ptr(),
                              compute_grad ? grad.mutable_data_ptr() : nullptr,
                              head_loss.mutable_data_ptr<float>(),
                              offsets_c.const_data_ptr<int64_t>(),
                              temperatures_c.const_data_ptr<float>(),
                              weights_c.const_data_ptr<float>(),
                              batch,
                              student.size(1),
                              num_heads,
                              values.size(2),
                              static_cast<float>(grad_scale)};
  const cudaError_t status = launch_sparse_kd_forward(args, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(status));

  // Per-row sums in a fixed order (deterministic), then the reduction's scale.
  at::Tensor rows = at::sum(head_loss, {1});
  at::Tensor loss = reduction_kind == kd::KDReduction::kNone ? rows : at::sum(rows).mul_(grad_scale);
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(rcfast, CUDA, m) {
  m.impl("sparse_multihead_kd_fwd", &sparse_multihead_kd_fwd_cuda);
}

}  // namespace cuda
}  // namespace rcfast
