// Calls unite_ext::ensemble_step through the dispatcher on a case worked out by hand.
//
// Model A (V=3): logits [0, 2, 1], tokens -> canonical ids [1, 2, 3], from_canon [-1, 0, 1, 2].
// Model B (V=2): logits [3, 0], tokens -> canonical ids [3, 1], from_canon [-1, 1, -1, 0].
// k = 1: A proposes canonical 2, B proposes 3; the union is {2, 3}.
// A: q = (e^0, e^-1) -> (0.7311, 0.2689). B cannot write 2 -> (0, 1). Average: (0.3655, 0.6345) -> 3.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>

int main() {
  using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("unite_ext::ensemble_step", "")
                .typed<Outputs(at::TensorList, at::TensorList, at::TensorList, int64_t, at::ArrayRef<double>,
                               double, double, const std::optional<at::Tensor>&)>();
  auto i32 = torch::TensorOptions().dtype(torch::kInt32);
  std::vector<at::Tensor> logits = {torch::tensor({{0.0f, 2.0f, 1.0f}}), torch::tensor({{3.0f, 0.0f}})};
  std::vector<at::Tensor> to_canon = {torch::tensor({1, 2, 3}, i32), torch::tensor({3, 1}, i32)};
  std::vector<at::Tensor> from_canon = {torch::tensor({-1, 0, 1, 2}, i32), torch::tensor({-1, 1, -1, 0}, i32)};
  std::vector<double> weights = {0.5, 0.5};
  auto [next_canon, next_ids, union_ids, union_probs, model_probs, top1, status] =
      op.call(logits, to_canon, from_canon, 1, weights, 0.0, 1.0, std::nullopt);

  const double p2 = 0.5 / (1.0 + std::exp(-1.0));
  bool ok = next_canon.item<int64_t>() == 3 && next_ids[0][0].item<int64_t>() == 2 &&
            next_ids[1][0].item<int64_t>() == 0 && union_ids[0][0].item<int64_t>() == 2 &&
            union_ids[0][1].item<int64_t>() == 3 && std::abs(union_probs[0][0].item<float>() - p2) < 1e-6 &&
            std::abs(union_probs[0][1].item<float>() - (1.0 - p2)) < 1e-6 && status[0].item<int32_t>() == 0;
  std::printf("next_canon=%lld p=(%.6f, %.6f) expected (%.6f, %.6f): %s\n",
              static_cast<long long>(next_canon.item<int64_t>()), union_probs[0][0].item<float>(),
              union_probs[0][1].item<float>(), p2, 1.0 - p2, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
