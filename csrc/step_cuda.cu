// CUDA implementation of the ensemble step (SPEC.md section 2).
//
// Three kernels, all on the current stream, with no host synchronisation and fixed output shapes:
//   topk_partial_kernel   one launch for all the models (per dtype); each block reads one chunk of one row of
//                         one model once, keeping a running top-k (warp-wide sorted lists) and the chunk's
//                         max and sum of exponentials;
//   topk_finalize_kernel  one block per (row, model) merges the chunks' lists and statistics;
//   union_average_kernel  one block per row: union, gather, renormalise, average, choose.
// Splitting each row over several blocks keeps the GPU busy when the batch is small. The two top-k
// kernels live in topk_cuda.cuh; this file launches them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "ops.h"
#include "step_common.h"
#include "topk_cuda.cuh"

namespace unite_ext {
namespace {

constexpr int64_t kMinChunk = 4096;      // elements per block at least, so each thread streams a few vectors
constexpr int kBlocksPerSm = 4;          // enough blocks in flight to saturate memory bandwidth

enum class LogitType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };
template <typename T>
constexpr LogitType kLogitTypeOf = LogitType::kFloat;
template <>
constexpr LogitType kLogitTypeOf<__nv_bfloat16> = LogitType::kBFloat16;
template <>
constexpr LogitType kLogitTypeOf<__half> = LogitType::kHalf;

struct ModelView {
  const void* logits;
  int64_t vocab;  // row length; rows are contiguous
  LogitType type;
  const int32_t* to_canon;
  const int32_t* from_canon;
};

__device__ __forceinline__ float load_logit(const ModelView& m, int64_t b, int64_t t) {
  const int64_t offset = b * m.vocab + t;
  switch (m.type) {
    case LogitType::kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(m.logits)[offset]);
    case LogitType::kHalf: return to_float(static_cast<const __half*>(m.logits)[offset]);
    default: return static_cast<const float*>(m.logits)[offset];
  }
}

struct UnionArgs {
  ModelView model[kMaxModels];
  const int64_t* topk_ids[kMaxModels];
  const float* topk_logits[kMaxModels];
  float weight[kMaxModels];
  int n;
  int k;
  int64_t num_canonical;
  int64_t batch;
  float temperature;
  float top_p;
  const float* uniforms;
  int64_t* next_canon;
  int64_t* next_ids;
  int64_t* union_ids;
  float* union_probs;
  float* model_probs;
  int32_t* status;
};

// Dynamic shared memory of union_average_kernel for a union width L = n * k.
constexpr size_t union_smem_bytes(int width) {
  return static_cast<size_t>(width) * (4 * sizeof(int32_t) + 4 * sizeof(float) + sizeof(int) + sizeof(bool));
}
static_assert(union_smem_bytes(kMaxModels * kMaxK) <= 48 * 1024, "the union must fit the default shared memory");

__global__ void __launch_bounds__(kThreads) union_average_kernel(UnionArgs args) {
  extern __shared__ unsigned char smem[];
  const int width = args.n * args.k;
  int32_t* candidate = reinterpret_cast<int32_t*>(smem);
  int32_t* first = candidate + width;
  int32_t* members = first + width;
  int32_t* token = members + width;
  float* q = reinterpret_cast<float*>(token + width);
  float* p = q + width;
  float* scaled = p + width;
  float* sorted = scaled + width;
  int* order = reinterpret_cast<int*>(sorted + width);
  bool* own = reinterpret_cast<bool*>(order + width);
  __shared__ int size;
  __shared__ float total;
  __shared__ int choice;

  const int64_t b = blockIdx.x;
  const int k = args.k;
  int32_t row_status = 0;
  float w_total = 0.0f;
  for (int i = 0; i < args.n; ++i) {
    if (args.topk_ids[i][b * k] < 0) {
      row_status |= 1 << i;
    } else {
      w_total += args.weight[i];
    }
  }

  // Step 2: candidates, then the ascending union by rank counting (the width is at most a few hundred).
  for (int s = threadIdx.x; s < width; s += blockDim.x) {
    const int i = s / k;
    const int64_t t = args.topk_ids[i][b * k + s % k];
    const int32_t c = t >= 0 ? args.model[i].to_canon[t] : -1;
    candidate[s] = c >= 0 && c < args.num_canonical ? c : -1;
    p[s] = 0.0f;
  }
  if (threadIdx.x == 0) size = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < width; s += blockDim.x) {
    bool is_first = candidate[s] >= 0;
    for (int o = 0; o < s && is_first; ++o) is_first = candidate[o] != candidate[s];
    first[s] = is_first;
    if (is_first) atomicAdd(&size, 1);
  }
  __syncthreads();
  for (int s = threadIdx.x; s < width; s += blockDim.x) {
    if (!first[s]) continue;
    int rank = 0;
    for (int o = 0; o < width; ++o) rank += first[o] && candidate[o] < candidate[s];
    members[rank] = candidate[s];
  }
  __syncthreads();
  const int union_size = size;

  // Steps 3-5, one model at a time.
  for (int i = 0; i < args.n; ++i) {
    float* model_row = args.model_probs + (i * args.batch + b) * width;
    if (row_status & (1 << i)) {
      for (int j = threadIdx.x; j < width; j += blockDim.x) model_row[j] = 0.0f;
      continue;
    }
    const ModelView m = args.model[i];
    const float best = args.topk_logits[i][b * k];
    for (int j = threadIdx.x; j < union_size; j += blockDim.x) {
      const int32_t t = m.from_canon[members[j]];
      const bool present = t >= 0 && t < m.vocab;
      token[j] = present ? t : -1;
      own[j] = present && m.to_canon[t] == members[j];
      q[j] = present ? expf(load_logit(m, b, t) - best) : 0.0f;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < union_size; j += blockDim.x) {
      if (!owns_token(token, own, union_size, j)) q[j] = 0.0f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // serial, in the CPU kernel's order
      float sum = 0.0f;
      for (int j = 0; j < union_size; ++j) sum += q[j];
      total = sum;
    }
    __syncthreads();
    const float w = w_total > 0.0f ? args.weight[i] / w_total : 0.0f;
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
      const float prob = j < union_size && total > 0.0f ? q[j] / total : 0.0f;
      model_row[j] = prob;
      p[j] += w * prob;
    }
    __syncthreads();
  }

  // Step 6.
  if (threadIdx.x == 0) {
    int best = -1;
    if (w_total > 0.0f) {
      for (int j = 0; j < union_size; ++j) {
        if (best < 0 || p[j] > p[best]) best = j;
      }
    }
    choice = best;
  }
  __syncthreads();
  if (args.temperature > 0.0f && choice >= 0) {
    const float log_max = logf(p[choice]);
    for (int j = threadIdx.x; j < union_size; j += blockDim.x) {
      scaled[j] = p[j] > 0.0f ? expf((logf(p[j]) - log_max) / args.temperature) : 0.0f;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < union_size; j += blockDim.x) {
      int rank = 0;
      for (int o = 0; o < union_size; ++o) rank += scaled[o] > scaled[j] || (scaled[o] == scaled[j] && o < j);
      order[rank] = j;
      sorted[rank] = scaled[j];
    }
    __syncthreads();
    if (threadIdx.x == 0) choice = order[nucleus_pick(sorted, union_size, args.top_p, args.uniforms[b])];
    __syncthreads();
  }

  for (int j = threadIdx.x; j < width; j += blockDim.x) {
    args.union_ids[b * width + j] = j < union_size ? members[j] : -1;
    args.union_probs[b * width + j] = j < union_size ? p[j] : 0.0f;
  }
  const int64_t chosen = choice >= 0 ? members[choice] : -1;
  for (int i = threadIdx.x; i < args.n; i += blockDim.x) {
    args.next_ids[i * args.batch + b] = chosen >= 0 ? args.model[i].from_canon[chosen] : -1;
  }
  if (threadIdx.x == 0) {
    args.next_canon[b] = chosen;
    args.status[b] = row_status;
  }
}

LogitType logit_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kBFloat16: return LogitType::kBFloat16;
    case at::kHalf: return LogitType::kHalf;
    default: return LogitType::kFloat;
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One launch of topk_partial_kernel for every model whose logits are of type T (none if there are none).
template <typename T, class List>
void launch_partial(const std::vector<at::Tensor>& logits, const std::vector<at::Tensor>& to_canon,
                    const std::vector<PartialView>& parts, int64_t k, int64_t chunk_elems) {
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

// Runs steps 0-1 for several models with warp lists of type List: fills `out[i]` from `logits[i]`.
template <class List>
void launch_topk_with(const std::vector<at::Tensor>& logits, const std::vector<at::Tensor>& to_canon, int64_t k,
                 const std::vector<TopkView>& out) {
  const int n = static_cast<int>(logits.size());
  const int64_t batch = logits[0].size(0);
  TORCH_CHECK(batch <= 65535, "unite_ext: the CUDA kernels take at most 65535 rows per call, got ", batch);
  int64_t total_vocab = 0;
  for (const auto& x : logits) total_vocab += x.size(1);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t chunk_elems =
      ceil_div(std::max(kMinChunk, ceil_div(batch * total_vocab, int64_t{kBlocksPerSm} * sms)), 2048) * 2048;

  std::vector<int64_t> chunks(n), offsets(n + 1, 0);
  for (int i = 0; i < n; ++i) {
    chunks[i] = ceil_div(logits[i].size(1), chunk_elems);
    offsets[i + 1] = offsets[i] + batch * chunks[i];
  }
  // One workspace for every model's partial results: per slot k values, k ids, max, sum, bad.
  auto workspace = at::empty({offsets[n] * (2 * k + 3)}, logits[0].options().dtype(at::kFloat));
  float* base = workspace.mutable_data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  FinalizeArgs args{};
  std::vector<PartialView> parts;
  for (int i = 0; i < n; ++i) {
    float* w = base + offsets[i] * (2 * k + 3);
    const int64_t slots = batch * chunks[i];
    parts.push_back(PartialView{w, reinterpret_cast<int32_t*>(w + slots * k), w + slots * 2 * k,
                                w + slots * (2 * k + 1), reinterpret_cast<int32_t*>(w + slots * (2 * k + 2)),
                                static_cast<int>(chunks[i])});
    args.partial[i] = parts[i];
    args.out[i] = out[i];
  }
  launch_partial<float, List>(logits, to_canon, parts, k, chunk_elems);
  launch_partial<__nv_bfloat16, List>(logits, to_canon, parts, k, chunk_elems);
  launch_partial<__half, List>(logits, to_canon, parts, k, chunk_elems);
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(n));
  topk_finalize_kernel<List><<<grid, kThreads, 0, stream>>>(args, static_cast<int>(k));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs steps 0-1 for several models: fills `out[i]` from `logits[i]`. The warp list is read from
// UNITE_EXT_CUDA_TOPK at every call ("insertion", the default, or "bitonic"); both give the same results.
void launch_topk(const std::vector<at::Tensor>& logits, const std::vector<at::Tensor>& to_canon, int64_t k,
                 const std::vector<TopkView>& out) {
  const char* variable = std::getenv("UNITE_EXT_CUDA_TOPK");
  const std::string list = variable == nullptr || *variable == '\0' ? "insertion" : variable;
  TORCH_CHECK(list == "insertion" || list == "bitonic",
              "unite_ext: UNITE_EXT_CUDA_TOPK must be 'insertion' or 'bitonic', got '", list, "'");
  if (list == "bitonic") {
    k <= 32 ? launch_topk_with<BitonicWarpList<1>>(logits, to_canon, k, out)
            : launch_topk_with<BitonicWarpList<2>>(logits, to_canon, k, out);
  } else {
    k <= 32 ? launch_topk_with<InsertionWarpList<1>>(logits, to_canon, k, out)
            : launch_topk_with<InsertionWarpList<2>>(logits, to_canon, k, out);
  }
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
    union_average_kernel<<<static_cast<unsigned>(batch), kThreads, union_smem_bytes(width),
                           at::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    launch_topk({logits.contiguous()}, {to_canon.contiguous()}, k,
                {TopkView{ids.mutable_data_ptr<int64_t>(), values.mutable_data_ptr<float>(),
                          top1.mutable_data_ptr<float>()}});
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
  auto ids = at::empty({n, batch, k}, opts.dtype(at::kLong));
  auto values = at::empty({n, batch, k}, opts.dtype(at::kFloat));
  auto top1 = at::empty({n, batch}, opts.dtype(at::kFloat));
  std::vector<TopkView> views;
  std::vector<const int64_t*> id_ptrs;
  std::vector<const float*> value_ptrs;
  for (int i = 0; i < n; ++i) {
    int64_t* id = ids.mutable_data_ptr<int64_t>() + i * batch * k;
    float* value = values.mutable_data_ptr<float>() + i * batch * k;
    views.push_back(TopkView{id, value, top1.mutable_data_ptr<float>() + i * batch});
    id_ptrs.push_back(id);
    value_ptrs.push_back(value);
  }
  if (batch > 0) launch_topk(logits, to_canon, k, views);
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
