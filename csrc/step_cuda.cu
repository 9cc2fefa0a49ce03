// CUDA implementation of the ensemble step (SPEC.md section 2).
//
// Three kernels, all on the current stream, with no host synchronisation and fixed output shapes:
//   topk_partial_kernel   one launch for all the models (per dtype); each block reads one chunk of one row of
//                         one model once, keeping a running top-k (warp-wide sorted lists) and the chunk's
//                         max and sum of exponentials;
//   topk_finalize_kernel  one block per (row, model) merges the chunks' lists and statistics;
//   union_average_kernel  one block per row: union, gather, renormalise, average, choose.
// Splitting each row over several blocks keeps the GPU busy when the batch is small. On sm_90 and later the
// second and third kernels are launched to overlap the one before (launch_overlapping). The kernels live in
// step_cuda.cuh; this file launches them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "ops.h"
#include "step_common.h"
#include "step_cuda.cuh"

namespace unite_ext {
namespace {

constexpr int64_t kMinChunk = 4096;      // elements per block at least, so each thread streams a few vectors
constexpr int kBlocksPerSm = 4;          // enough blocks in flight to saturate memory bandwidth

template <typename T>
constexpr LogitType kLogitTypeOf = LogitType::kFloat;
template <>
constexpr LogitType kLogitTypeOf<__nv_bfloat16> = LogitType::kBFloat16;
template <>
constexpr LogitType kLogitTypeOf<__half> = LogitType::kHalf;

LogitType logit_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return LogitType::kBFloat16;
    case at::kHalf: return LogitType::kHalf;
    default: return LogitType::kFloat;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Launches a kernel that begins with wait_for_previous_kernel() so that, on sm_90 and later, it may start
// while the kernel before it on the stream finishes (programmatic dependent launch): its launch latency
// overlaps that kernel's last blocks instead of following them.
template <typename... Params, typename... Args>
void launch_overlapping(void (*kernel)(Params...), dim3 grid, size_t shared_bytes, Args&&... args) {
  cudaLaunchAttribute overlap{};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = at::cuda::getCurrentCUDAStream();
  config.attrs = &overlap;
  config.numAttrs = at::cuda::getCurrentDeviceProperties()->major >= 9 ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// One launch of topk_partial_kernel for every model whose logits are of type T (none if there are none).
template <typename T, class List>
void launch_partial(const std::vector<at::Tensor>& logits, const std::vector<at::Tensor>& to_canon,
                    const PartialView* parts, int64_t k, int64_t chunk_elems) {
  PartialArgs<T> args{};
  int chunks = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logit_type(logits[i]) != kLogitTypeOf<T>) continue;
    args.model[args.n++] = PartialModel<T>{static_cast<const T*>(logits[i].const_data_ptr()), logits[i].size(1),
                                           to_canon[i].const_data_ptr<int32_t>(), parts[i], chunks};
    chunks += parts[i].chunks;
  }
  if (args.n == 0) return;
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(logits[0].size(0)));
  topk_partial_kernel<T, List>
      <<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args, static_cast<int>(k), chunk_elems);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// How a top-k launch splits the rows of several models into blocks.
struct TopkPlan {
  int64_t chunk_elems;          // logits per block
  std::vector<int64_t> chunks;  // blocks per row, per model
  int64_t workspace_floats;     // partial results of every (row, chunk) of every model
};

TopkPlan plan_topk(const std::vector<at::Tensor>& logits, int64_t k) {
  const int64_t batch = logits[0].size(0);
  TORCH_CHECK(batch <= 65535, "unite_ext: the CUDA kernels take at most 65535 rows per call, got ", batch);
  int64_t total_vocab = 0;
  for (const auto& x : logits) total_vocab += x.size(1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_block = std::max(kMinChunk, ceil_div(batch * total_vocab, int64_t{kBlocksPerSm} * sms));
  TopkPlan plan{ceil_div(per_block, 2048) * 2048, {}, 0};
  for (const auto& x : logits) {
    plan.chunks.push_back(ceil_div(x.size(1), plan.chunk_elems));
    plan.workspace_floats += partial_floats(batch * plan.chunks.back(), k);
  }
  return plan;
}

// Runs steps 0-1 for several models with warp lists of type List: fills `out[i]` from `logits[i]`, with
// the partial results in `workspace` (plan.workspace_floats floats).
template <class List>
void launch_topk_with(const std::vector<at::Tensor>& logits, const std::vector<at::Tensor>& to_canon, int64_t k,
                      const std::vector<TopkView>& out, const TopkPlan& plan, float* workspace) {
  const int n = static_cast<int>(logits.size());
  const int64_t batch = logits[0].size(0);
  FinalizeArgs args{};
  lay_out_partials(workspace, n, plan.chunks.data(), batch, k, args.partial);
  for (int i = 0; i < n; ++i) args.out[i] = out[i];
  launch_partial<float, List>(logits, to_canon, args.partial, k, plan.chunk_elems);
  launch_partial<__nv_bfloat16, List>(logits, to_canon, args.partial, k, plan.chunk_elems);
  launch_partial<__half, List>(logits, to_canon, args.partial, k, plan.chunk_elems);
  launch_overlapping(topk_finalize_kernel<List>, dim3(static_cast<unsigned>(batch), static_cast<unsigned>(n)), 0,
                     args, static_cast<int>(k));
}

// Runs steps 0-1 for several models: fills `out[i]` from `logits[i]`.
void launch_topk(const std::vector<at::Tensor>& logits, const std::vector<at::Tensor>& to_canon, int64_t k,
                 const std::vector<TopkView>& out, const TopkPlan& plan, float* workspace) {
  with_warp_list(k, [&](auto warp_list) {
    launch_topk_with<decltype(warp_list)>(logits, to_canon, k, out, plan, workspace);
  });
}

std::vector<at::Tensor> contiguous(at::TensorList list) {
  std::vector<at::Tensor> out;
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

UnionAverage launch_union_average(const std::vector<at::Tensor>& logits, const std::vector<at::Tensor>& to_canon,
                                  const std::vector<at::Tensor>& from_canon, const std::vector<const int64_t*>& ids,
                                  const std::vector<const float*>& values, int64_t k, at::ArrayRef<double> weights,
                                  double temperature, double top_p, const std::optional<at::Tensor>& uniforms) {
  const int n = static_cast<int>(logits.size());
  const int64_t batch = logits[0].size(0);
  const int width = static_cast<int>(n * k);
  auto opts = logits[0].options();
  auto next_canon = at::empty({batch}, opts.dtype(at::kLong));
  auto next_ids = at::empty({n, batch}, opts.dtype(at::kLong));
  auto union_ids = at::empty({batch, width}, opts.dtype(at::kLong));
  auto union_probs = at::empty({batch, width}, opts.dtype(at::kFloat));
  auto model_probs = at::empty({n, batch, width}, opts.dtype(at::kFloat));
  auto status = at::empty({batch}, opts.dtype(at::kInt));
  at::Tensor r = temperature > 0 ? uniforms->contiguous() : at::Tensor();

  UnionArgs args{};
  for (int i = 0; i < n; ++i) {
    args.model[i] = ModelView{logits[i].const_data_ptr(), logits[i].size(1), logit_type(logits[i]),
                              to_canon[i].const_data_ptr<int32_t>(), from_canon[i].const_data_ptr<int32_t>()};
    args.topk_ids[i] = ids[i];
    args.topk_logits[i] = values[i];
    args.weight[i] = static_cast<float>(weights[i]);
  }
  args.n = n;
  args.k = static_cast<int>(k);
  args.num_canonical = from_canon[0].size(0);
  args.batch = batch;
  args.temperature = static_cast<float>(temperature);
  args.top_p = static_cast<float>(top_p);
  args.uniforms = temperature > 0 ? r.const_data_ptr<float>() : nullptr;
  args.next_canon = next_canon.mutable_data_ptr<int64_t>();
  args.next_ids = next_ids.mutable_data_ptr<int64_t>();
  args.union_ids = union_ids.mutable_data_ptr<int64_t>();
  args.union_probs = union_probs.mutable_data_ptr<float>();
  args.model_probs = model_probs.mutable_data_ptr<float>();
  args.status = status.mutable_data_ptr<int32_t>();

  if (batch > 0) {
    launch_overlapping(union_average_kernel, dim3(static_cast<unsigned>(batch)), union_smem_bytes(n, width), args);
  }
  return {next_canon, next_ids, union_ids, union_probs, model_probs, status};
}

}  // namespace

TopkStats topk_stats_cuda(const at::Tensor& logits, const at::Tensor& to_canon, int64_t k) {
  check_topk_args(logits, to_canon, k);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = logits.size(0);
  auto opts = logits.options();
  auto ids = at::empty({batch, k}, opts.dtype(at::kLong));
  auto values = at::empty({batch, k}, opts.dtype(at::kFloat));
  auto top1 = at::empty({batch}, opts.dtype(at::kFloat));
  if (batch > 0) {
    const std::vector<at::Tensor> x{logits.contiguous()};
    const TopkPlan plan = plan_topk(x, k);
    auto workspace = at::empty({plan.workspace_floats}, opts.dtype(at::kFloat));
    launch_topk(x, {to_canon.contiguous()}, k,
                {TopkView{ids.mutable_data_ptr<int64_t>(), values.mutable_data_ptr<float>(),
                          top1.mutable_data_ptr<float>()}},
                plan, workspace.mutable_data_ptr<float>());
  }
  return {ids, values, top1};
}

UnionAverage union_average_cuda(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon,
                                at::TensorList topk_ids, at::TensorList topk_logits, at::ArrayRef<double> weights,
                                double temperature, double top_p, const std::optional<at::Tensor>& uniforms) {
  check_union_args(logits, to_canon, from_canon, topk_ids, topk_logits, weights, temperature, top_p, uniforms);
  const c10::cuda::CUDAGuard guard(logits[0].device());
  auto ids = contiguous(topk_ids);
  auto values = contiguous(topk_logits);
  std::vector<const int64_t*> id_ptrs;
  std::vector<const float*> value_ptrs;
  for (size_t i = 0; i < ids.size(); ++i) {
    id_ptrs.push_back(ids[i].const_data_ptr<int64_t>());
    value_ptrs.push_back(values[i].const_data_ptr<float>());
  }
  return launch_union_average(contiguous(logits), contiguous(to_canon), contiguous(from_canon), id_ptrs, value_ptrs,
                              topk_ids[0].size(1), weights, temperature, top_p, uniforms);
}

StepOutputs ensemble_step_cuda(at::TensorList logits_list, at::TensorList to_canon_list,
                               at::TensorList from_canon_list, int64_t k, at::ArrayRef<double> weights,
                               double temperature, double top_p, const std::optional<at::Tensor>& uniforms) {
  check_step_args(logits_list, to_canon_list, from_canon_list, k, weights, temperature, top_p, uniforms);
  const c10::cuda::CUDAGuard guard(logits_list[0].device());
  auto logits = contiguous(logits_list);
  auto to_canon = contiguous(to_canon_list);
  auto from_canon = contiguous(from_canon_list);
  const int n = static_cast<int>(logits.size());
  const int64_t batch = logits[0].size(0);
  auto opts = logits[0].options();
  auto top1 = at::empty({n, batch}, opts.dtype(at::kFloat));
  // The top-k lists ([N, B, k] int64 ids, then float logits) and the partial results share one allocation,
  // not three: at small B every allocation is a noticeable share of a step's host time.
  const int64_t entries = n * batch * k;
  const TopkPlan plan = plan_topk(logits, k);
  auto scratch = at::empty({3 * entries + plan.workspace_floats}, opts.dtype(at::kFloat));
  int64_t* ids = reinterpret_cast<int64_t*>(scratch.mutable_data_ptr<float>());
  float* values = scratch.mutable_data_ptr<float>() + 2 * entries;
  std::vector<TopkView> views;
  std::vector<const int64_t*> id_ptrs;
  std::vector<const float*> value_ptrs;
  for (int i = 0; i < n; ++i) {
    views.push_back(TopkView{ids + i * batch * k, values + i * batch * k, top1.mutable_data_ptr<float>() + i * batch});
    id_ptrs.push_back(views.back().ids);
    value_ptrs.push_back(views.back().logits);
  }
  if (batch > 0) launch_topk(logits, to_canon, k, views, plan, values + entries);
  auto [next_canon, next_ids, union_ids, union_probs, model_probs, status] = launch_union_average(
      logits, to_canon, from_canon, id_ptrs, value_ptrs, k, weights, temperature, top_p, uniforms);
  return {next_canon, next_ids, union_ids, union_probs, model_probs, top1, status};
}

TORCH_LIBRARY_IMPL(unite_ext, CUDA, m) {
  m.impl("topk_stats", &topk_stats_cuda);
  m.impl("union_average", &union_average_cuda);
  m.impl("ensemble_step", &ensemble_step_cuda);
}

}  // namespace unite_ext
