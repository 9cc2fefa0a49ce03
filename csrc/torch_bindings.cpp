// The op schemas of unite_ext (one place) and the argument checks every backend shares.
#include <torch/library.h>

#include <cmath>

#include "ops.h"
#include "step_common.h"

namespace unite_ext {
namespace {

bool is_logits_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Checks each model's logits and tables; returns the batch size.
int64_t check_models(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon) {
  const auto n = logits.size();
  TORCH_CHECK(n >= 1 && n <= static_cast<size_t>(kMaxModels), "unite_ext: between 1 and ", kMaxModels,
              " models are supported, got ", n);
  TORCH_CHECK(to_canon.size() == n && from_canon.size() == n, "unite_ext: logits has ", n, " entries but to_canon has ",
              to_canon.size(), " and from_canon ", from_canon.size());
  const auto device = logits[0].device();
  const auto batch = logits[0].dim() == 2 ? logits[0].size(0) : -1;
  const auto num_canonical = from_canon[0].dim() == 1 ? from_canon[0].size(0) : -1;
  TORCH_CHECK(num_canonical >= 1, "unite_ext: from_canon[0] must be a non-empty 1-D tensor");
  for (size_t i = 0; i < n; ++i) {
    check_topk_args(logits[i], to_canon[i], 1);
    TORCH_CHECK(logits[i].device() == device, "unite_ext: logits[", i, "] is on ", logits[i].device(),
                " but logits[0] is on ", device);
    TORCH_CHECK(logits[i].size(0) == batch, "unite_ext: logits[", i, "] has batch size ", logits[i].size(0),
                " but logits[0] has ", batch);
    TORCH_CHECK(from_canon[i].dim() == 1 && from_canon[i].scalar_type() == at::kInt &&
                    from_canon[i].size(0) == num_canonical && from_canon[i].device() == device,
                "unite_ext: from_canon[", i, "] must be a 1-D int32 tensor of ", num_canonical, " entries on ", device);
  }
  return batch;
}

void check_choice_args(int64_t n, int64_t batch, c10::Device device, at::ArrayRef<double> weights,
                       double temperature, double top_p, const std::optional<at::Tensor>& uniforms) {
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == n, "unite_ext: weights has ", weights.size(),
              " entries for ", n, " models");
  double total = 0.0;
  for (double w : weights) {
    TORCH_CHECK(w >= 0.0 && std::isfinite(w), "unite_ext: weights must be finite and >= 0");
    total += w;
  }
  TORCH_CHECK(total > 0.0, "unite_ext: weights are all zero");
  TORCH_CHECK(temperature >= 0.0 && std::isfinite(temperature), "unite_ext: temperature must be >= 0");
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "unite_ext: top_p must be in (0, 1]");
  if (temperature > 0.0) {
    TORCH_CHECK(uniforms.has_value(), "unite_ext: sampling (temperature > 0) needs uniforms");
    TORCH_CHECK(uniforms->dim() == 1 && uniforms->size(0) == batch && uniforms->scalar_type() == at::kFloat &&
                    uniforms->device() == device,
                "unite_ext: uniforms must be a float32 [", batch, "] tensor on ", device);
  }
}

}  // namespace

void check_topk_args(const at::Tensor& logits, const at::Tensor& to_canon, int64_t k) {
  TORCH_CHECK(logits.dim() == 2, "unite_ext: logits must be 2-D [B, V], got ", logits.sizes());
  TORCH_CHECK(is_logits_dtype(logits.scalar_type()), "unite_ext: logits must be float32, bfloat16 or float16, got ",
              logits.scalar_type());
  TORCH_CHECK(to_canon.dim() == 1 && to_canon.scalar_type() == at::kInt, "unite_ext: to_canon must be 1-D int32");
  TORCH_CHECK(to_canon.device() == logits.device(), "unite_ext: to_canon is on ", to_canon.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(to_canon.size(0) == logits.size(1), "unite_ext: logits have ", logits.size(1),
              " columns but to_canon has ", to_canon.size(0), " entries");
  TORCH_CHECK(k >= 1 && k <= kMaxK, "unite_ext: k must be in 1..", kMaxK, ", got ", k);
}

void check_union_args(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon,
                      at::TensorList topk_ids, at::TensorList topk_logits, at::ArrayRef<double> weights,
                      double temperature, double top_p, const std::optional<at::Tensor>& uniforms) {
  const int64_t batch = check_models(logits, to_canon, from_canon);
  const auto n = logits.size();
  TORCH_CHECK(topk_ids.size() == n && topk_logits.size() == n, "unite_ext: topk_ids and topk_logits need ", n,
              " entries");
  const int64_t k = topk_ids[0].dim() == 2 ? topk_ids[0].size(1) : -1;
  TORCH_CHECK(k >= 1 && k <= kMaxK, "unite_ext: topk_ids must be [B, k] with k in 1..", kMaxK);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(topk_ids[i].scalar_type() == at::kLong && topk_ids[i].dim() == 2 && topk_ids[i].size(0) == batch &&
                    topk_ids[i].size(1) == k && topk_ids[i].device() == logits[0].device(),
                "unite_ext: topk_ids[", i, "] must be int64 [", batch, ", ", k, "] on ", logits[0].device());
    TORCH_CHECK(topk_logits[i].scalar_type() == at::kFloat && topk_logits[i].sizes() == topk_ids[i].sizes() &&
                    topk_logits[i].device() == logits[0].device(),
                "unite_ext: topk_logits[", i, "] must be float32 [", batch, ", ", k, "] on ", logits[0].device());
  }
  check_choice_args(static_cast<int64_t>(n), batch, logits[0].device(), weights, temperature, top_p, uniforms);
}

void check_step_args(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon, int64_t k,
                     at::ArrayRef<double> weights, double temperature, double top_p,
                     const std::optional<at::Tensor>& uniforms) {
  const int64_t batch = check_models(logits, to_canon, from_canon);
  TORCH_CHECK(k >= 1 && k <= kMaxK, "unite_ext: k must be in 1..", kMaxK, ", got ", k);
  check_choice_args(static_cast<int64_t>(logits.size()), batch, logits[0].device(), weights, temperature, top_p,
                    uniforms);
}

TORCH_LIBRARY(unite_ext, m) {
  m.def("topk_stats(Tensor logits, Tensor to_canon, int k) -> (Tensor topk_ids, Tensor topk_logits, Tensor top1_prob)");
  m.def(
      "union_average(Tensor[] logits, Tensor[] to_canon, Tensor[] from_canon, Tensor[] topk_ids, "
      "Tensor[] topk_logits, float[] weights, float temperature, float top_p, Tensor? uniforms) -> "
      "(Tensor next_canon, Tensor next_ids, Tensor union_ids, Tensor union_probs, Tensor model_probs, "
      "Tensor status)");
  m.def(
      "ensemble_step(Tensor[] logits, Tensor[] to_canon, Tensor[] from_canon, int k, float[] weights, "
      "float temperature, float top_p, Tensor? uniforms) -> (Tensor next_canon, Tensor next_ids, "
      "Tensor union_ids, Tensor union_probs, Tensor model_probs, Tensor top1_prob, Tensor status)");
}

}  // namespace unite_ext
