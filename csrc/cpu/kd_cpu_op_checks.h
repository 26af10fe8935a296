// kd_cpu_op_checks.h — the argument checks the two CPU ops share:
// rcfast::multihead_kd_fwd (kd_cpu.cpp) and rcfast::sparse_multihead_kd_fwd
// (sparse_kd_cpu.cpp). A second line of defence behind the Python front ends
// (rcfast/ops/multihead_kd.py), so messages name the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "kd_math.h"

namespace rcfast {
namespace cpu {

inline bool is_supported_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf;
}

inline kd::KDReduction check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(kd::kd_is_reduction(reduction), op,
              "reduction must be 0 (none), 1 (sum), 2 (mean) or 3 (batchmean), got ", reduction);
  return static_cast<kd::KDReduction>(reduction);
}

// The per-head tables, checked: contiguous copies and raw pointers into them
// (valid as long as this object lives).
struct HeadTables {
  at::Tensor offsets_c, temperatures_c, weights_c;
  const int64_t* offsets;
  const float* taus;
  const float* weights;
  int64_t num_heads;
};

// head_offsets int64 [H + 1] from 0, strictly increasing, ending at
// total_classes; temperatures and weights float32 [H], finite, temperatures > 0.
inline HeadTables check_head_tables(const char* op, const at::Tensor& head_offsets, const at::Tensor& temperatures,
                                    const at::Tensor& weights, int64_t total_classes) {
  TORCH_CHECK(head_offsets.dim() == 1 && head_offsets.scalar_type() == at::kLong, op,
              "head_offsets must be a 1-D int64 tensor [H + 1], got ", head_offsets.scalar_type(), " with ",
              head_offsets.dim(), " dims");
  const int64_t num_heads = head_offsets.size(0) - 1;
  TORCH_CHECK(num_heads >= 1, op, "head_offsets must hold at least 2 values (one head)");
  TORCH_CHECK(temperatures.dim() == 1 && temperatures.size(0) == num_heads &&
                  temperatures.scalar_type() == at::kFloat,
              op, "temperatures must be float32 [H] with H = ", num_heads, ", got ", temperatures.scalar_type(),
              " of shape ", temperatures.sizes());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == num_heads && weights.scalar_type() == at::kFloat, op,
              "weights must be float32 [H] with H = ", num_heads, ", got ", weights.scalar_type(), " of shape ",
              weights.sizes());
  HeadTables tables{head_offsets.contiguous(), temperatures.contiguous(), weights.contiguous(),
                    nullptr, nullptr, nullptr, num_heads};
  tables.offsets = tables.offsets_c.const_data_ptr<int64_t>();
  tables.taus = tables.temperatures_c.const_data_ptr<float>();
  tables.weights = tables.weights_c.const_data_ptr<float>();
  const int64_t* offsets = tables.offsets;
  TORCH_CHECK(offsets[0] == 0, op, "head_offsets must start at 0, got ", offsets[0]);
  for (int64_t h = 0; h < num_heads; ++h) {
    TORCH_CHECK(offsets[h + 1] > offsets[h], op, "head_offsets must be strictly increasing, got ", offsets[h],
                " then ", offsets[h + 1], " at head ", h);
    TORCH_CHECK(std::isfinite(tables.taus[h]) && tables.taus[h] > 0.0f, op,
                "temperatures must be finite and > 0, got ", tables.taus[h], " for head ", h);
    TORCH_CHECK(std::isfinite(tables.weights[h]), op, "weights must be finite, got ", tables.weights[h],
                " for head ", h);
  }
  TORCH_CHECK(offsets[num_heads] == total_classes, op, "head_offsets must end at N = ", total_classes,
              " (the logits' columns), got ", offsets[num_heads]);
  return tables;
}

}  // namespace cpu
}  // namespace rcfast
