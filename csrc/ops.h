// Every op of unite_ext, declared once. Schemas live in torch_bindings.cpp; each backend file
// registers its implementations with TORCH_LIBRARY_IMPL. Semantics: SPEC.md section 2.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace unite_ext {

using TopkStats = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // topk_ids, topk_logits, top1_prob
using UnionAverage = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using StepOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Argument checks shared by every backend (torch_bindings.cpp).
void check_topk_args(const at::Tensor& logits, const at::Tensor& to_canon, int64_t k);
void check_union_args(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon,
                      at::TensorList topk_ids, at::TensorList topk_logits, at::ArrayRef<double> weights,
                      double temperature, double top_p, const std::optional<at::Tensor>& uniforms);
void check_step_args(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon, int64_t k,
                     at::ArrayRef<double> weights, double temperature, double top_p,
                     const std::optional<at::Tensor>& uniforms);

TopkStats topk_stats_cpu(const at::Tensor& logits, const at::Tensor& to_canon, int64_t k);
UnionAverage union_average_cpu(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon,
                               at::TensorList topk_ids, at::TensorList topk_logits,
                               at::ArrayRef<double> weights, double temperature, double top_p,
                               const std::optional<at::Tensor>& uniforms);
StepOutputs ensemble_step_cpu(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon,
                              int64_t k, at::ArrayRef<double> weights, double temperature, double top_p,
                              const std::optional<at::Tensor>& uniforms);

#ifdef UNITE_EXT_WITH_CUDA
TopkStats topk_stats_cuda(const at::Tensor& logits, const at::Tensor& to_canon, int64_t k);
UnionAverage union_average_cuda(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon,
                                at::TensorList topk_ids, at::TensorList topk_logits,
                                at::ArrayRef<double> weights, double temperature, double top_p,
                                const std::optional<at::Tensor>& uniforms);
StepOutputs ensemble_step_cuda(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon,
                               int64_t k, at::ArrayRef<double> weights, double temperature, double top_p,
                               const std::optional<at::Tensor>& uniforms);
#endif

}  // namespace unite_ext
