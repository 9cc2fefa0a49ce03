// CPU implementation of the ensemble step (SPEC.md section 2).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "step_common.h"

namespace unite_ext {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Logits are read in blocks small enough to stay in L1 while the block's maximum, its sum of
// exponentials and the top-k check run over it: one pass over memory.
constexpr int kBlock = 512;

// exp(x) for x <= 0 (about 2 ulp; x below -87 gives ~1e-38 instead of 0, irrelevant next to the
// row maximum's 1). Branch-free so that the compiler vectorises the loops that call it.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float f = t - n;                           // in [-0.5, 0.5]
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// The per-block loops are vectorised through `omp simd` reductions (-fno-trapping-math lets the
// compiler turn the clamps into selects) and cloned for AVX2, dispatched at load time on machines that
// have it.

// Converts one block of logits to float; returns its maximum and flags a NaN or +inf in `bad`.
template <typename scalar_t>
inline float load_block_impl(const scalar_t* x, int len, float* block, int* bad) {
  float max = -kInf;
  int block_bad = 0;
#pragma omp simd reduction(max : max) reduction(| : block_bad)
  for (int j = 0; j < len; ++j) {
    const float v = static_cast<float>(x[j]);
    block[j] = v;
    max = v > max ? v : max;
    block_bad |= (v != v) | (v == kInf);
  }
  *bad |= block_bad;
  return max;
}

#define UNITE_EXT_LOAD_BLOCK(scalar_t)                                                                      \
  __attribute__((target_clones("avx2", "default"))) float load_block(const scalar_t* x, int len, float* block, \
                                                                     int* bad) {                              \
    return load_block_impl(x, len, block, bad);                                                               \
  }
UNITE_EXT_LOAD_BLOCK(float)
UNITE_EXT_LOAD_BLOCK(at::BFloat16)
UNITE_EXT_LOAD_BLOCK(at::Half)
#undef UNITE_EXT_LOAD_BLOCK

// Sum of exp(block[j] - max) over one block.
__attribute__((target_clones("avx2", "default"))) float block_sum_exp(const float* block, int len, float max) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < len; ++j) sum += exp_nonpositive(block[j] - max);
  return sum;
}

// Running top-k of one row, ordered by ranks_before. Tokens arrive in ascending id order, so an equal
// logit arriving later never displaces an earlier one.
struct RunningTopk {
  int k;
  int size = 0;
  float value[kMaxK];
  int64_t id[kMaxK];

  float threshold() const { return size < k ? -kInf : value[k - 1]; }

  void insert(float v, int64_t t) {
    int pos = size < k ? size++ : k - 1;
    while (pos > 0 && value[pos - 1] < v) {
      value[pos] = value[pos - 1];
      id[pos] = id[pos - 1];
      --pos;
    }
    value[pos] = v;
    id[pos] = t;
  }
};

// What one chunk of a row contributes to the row's top-k and softmax denominator.
struct ChunkTopk {
  RunningTopk top;
  float max = -kInf;
  float sum_exp = 0.0f;  // sum of exp(x - max) over the chunk
  int bad = 0;           // a NaN or +inf was seen
};

template <typename scalar_t>
void topk_chunk(const scalar_t* x, const int32_t* to_canon, int64_t first_id, int64_t len, ChunkTopk* out) {
  RunningTopk& top = out->top;
  float chunk_max = -kInf, sum_exp = 0.0f;
  int bad = 0;
  float block[kBlock];
  for (int64_t start = 0; start < len; start += kBlock) {
    const int block_len = static_cast<int>(std::min<int64_t>(kBlock, len - start));
    const float block_max = load_block(x + start, block_len, block, &bad);
    if (bad) break;  // the row is left out; keep nothing else
    if (block_max == -kInf) continue;
    if (block_max > chunk_max) {
      sum_exp = chunk_max == -kInf ? 0.0f : sum_exp * std::exp(chunk_max - block_max);
      chunk_max = block_max;
    }
    sum_exp += block_sum_exp(block, block_len, chunk_max);
    if (block_max <= top.threshold()) continue;
    for (int j = 0; j < block_len; ++j) {
      const float v = block[j];
      if (v > top.threshold() && to_canon[start + j] >= 0) top.insert(v, first_id + start + j);
    }
  }
  out->max = chunk_max;
  out->sum_exp = sum_exp;
  out->bad = bad;
}

// Joins a row's chunks, given in ascending token order: inserting their candidates in that order keeps
// the smaller id first among equal logits.
void merge_chunks(const ChunkTopk* chunks, int64_t count, int k, int64_t* ids_out, float* values_out,
                  float* top1_out) {
  RunningTopk top{k};
  float row_max = -kInf;
  int bad = 0;
  for (int64_t c = 0; c < count; ++c) {
    bad |= chunks[c].bad;
    row_max = std::max(row_max, chunks[c].max);
  }
  float sum_exp = 0.0f;
  for (int64_t c = 0; c < count && !bad; ++c) {
    const ChunkTopk& chunk = chunks[c];
    if (chunk.max == -kInf) continue;
    sum_exp += chunk.sum_exp * std::exp(chunk.max - row_max);
    for (int s = 0; s < chunk.top.size && chunk.top.value[s] > top.threshold(); ++s) {
      top.insert(chunk.top.value[s], chunk.top.id[s]);
    }
  }
  const bool usable = !bad && top.size > 0;
  for (int s = 0; s < k; ++s) {
    const bool kept = usable && s < top.size;
    ids_out[s] = kept ? top.id[s] : -1;
    values_out[s] = kept ? top.value[s] : -kInf;
  }
  *top1_out = usable ? std::exp(top.value[0] - row_max) / sum_exp : 0.0f;
}

// Calls f(scalar_t{}) with the C++ type of a logits dtype (float32, bfloat16 or float16; checked before).
template <typename F>
void dispatch_logit_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: f(float{});
  }
}

struct TopkOutputs {
  at::Tensor ids, values, top1;
};

TopkOutputs empty_topk_outputs(const at::Tensor& logits, int64_t k) {
  const auto batch = logits.size(0);
  auto opts = logits.options();
  return {at::empty({batch, k}, opts.dtype(at::kLong)), at::empty({batch, k}, opts.dtype(at::kFloat)),
          at::empty({batch}, opts.dtype(at::kFloat))};
}

// Rows are cut into chunks of this many logits, so that the work of a small batch (B = 1, one large and
// one small vocabulary) spreads evenly over the cores. The cut does not depend on the thread count, so
// neither do the results.
constexpr int64_t kChunk = 32 * kBlock;

// Top-k of several models at once: chunks of every (model, row) pair in parallel, then a merge per pair.
std::vector<TopkOutputs> topk_many(at::TensorList logits_list, at::TensorList to_canon_list, int64_t k) {
  const int64_t n = static_cast<int64_t>(logits_list.size());
  const int64_t batch = logits_list[0].size(0);
  std::vector<at::Tensor> logits(n), to_canon(n);
  std::vector<TopkOutputs> outs(n);
  std::vector<int64_t> chunks(n), first_task(n + 1, 0);  // chunks per row; index of a model's first chunk
  for (int64_t i = 0; i < n; ++i) {
    logits[i] = logits_list[i].contiguous();
    to_canon[i] = to_canon_list[i].contiguous();
    outs[i] = empty_topk_outputs(logits[i], k);
    chunks[i] = std::max<int64_t>(1, (logits[i].size(1) + kChunk - 1) / kChunk);
    first_task[i + 1] = first_task[i] + batch * chunks[i];
  }
  std::vector<ChunkTopk> parts(first_task[n], ChunkTopk{RunningTopk{static_cast<int>(k)}});
  at::parallel_for(0, first_task[n], 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t i = 0;
      while (task >= first_task[i + 1]) ++i;
      const int64_t b = (task - first_task[i]) / chunks[i], c = (task - first_task[i]) % chunks[i];
      const int64_t vocab = logits[i].size(1), start = c * kChunk;
      dispatch_logit_type(logits[i].scalar_type(), [&](auto zero) {
        using scalar_t = decltype(zero);
        topk_chunk<scalar_t>(logits[i].const_data_ptr<scalar_t>() + b * vocab + start,
                             to_canon[i].const_data_ptr<int32_t>() + start, start,
                             std::min(kChunk, vocab - start), &parts[task]);
      });
    }
  });
  at::parallel_for(0, n * batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t i = pair / batch, b = pair % batch;
      merge_chunks(&parts[first_task[i] + b * chunks[i]], chunks[i], static_cast<int>(k),
                   outs[i].ids.mutable_data_ptr<int64_t>() + b * k, outs[i].values.mutable_data_ptr<float>() + b * k,
                   outs[i].top1.mutable_data_ptr<float>() + b);
    }
  });
  return outs;
}

float logit_at(const at::Tensor& logits, int64_t b, int64_t t) {
  const int64_t offset = b * logits.size(1) + t;
  switch (logits.scalar_type()) {
    case at::kFloat: return logits.const_data_ptr<float>()[offset];
    case at::kBFloat16: return static_cast<float>(logits.const_data_ptr<at::BFloat16>()[offset]);
    case at::kHalf: return static_cast<float>(logits.const_data_ptr<at::Half>()[offset]);
    default: TORCH_CHECK(false, "unite_ext: unsupported logits dtype ", logits.scalar_type());
  }
}

}  // namespace

TopkStats topk_stats_cpu(const at::Tensor& logits, const at::Tensor& to_canon, int64_t k) {
  check_topk_args(logits, to_canon, k);
  auto outs = topk_many({logits}, {to_canon}, k);
  return {outs[0].ids, outs[0].values, outs[0].top1};
}

UnionAverage union_average_cpu(at::TensorList logits_list, at::TensorList to_canon_list,
                               at::TensorList from_canon_list, at::TensorList topk_ids_list,
                               at::TensorList topk_logits_list, at::ArrayRef<double> weights, double temperature,
                               double top_p, const std::optional<at::Tensor>& uniforms) {
  check_union_args(logits_list, to_canon_list, from_canon_list, topk_ids_list, topk_logits_list, weights,
                   temperature, top_p, uniforms);
  const int n = static_cast<int>(logits_list.size());
  const int64_t batch = topk_ids_list[0].size(0), k = topk_ids_list[0].size(1);
  const int width = static_cast<int>(n * k);
  std::vector<at::Tensor> logits(n), to_canon(n), from_canon(n), topk_ids(n), topk_logits(n);
  for (int i = 0; i < n; ++i) {
    logits[i] = logits_list[i].contiguous();
    to_canon[i] = to_canon_list[i].contiguous();
    from_canon[i] = from_canon_list[i].contiguous();
    topk_ids[i] = topk_ids_list[i].contiguous();
    topk_logits[i] = topk_logits_list[i].contiguous();
  }
  const int64_t num_canonical = from_canon[0].size(0);
  at::Tensor r = temperature > 0 ? uniforms->contiguous() : at::Tensor();

  auto opts = logits[0].options();
  auto next_canon = at::empty({batch}, opts.dtype(at::kLong));
  auto next_ids = at::empty({n, batch}, opts.dtype(at::kLong));
  auto union_ids = at::empty({batch, width}, opts.dtype(at::kLong));
  auto union_probs = at::empty({batch, width}, opts.dtype(at::kFloat));
  auto model_probs = at::empty({n, batch, width}, opts.dtype(at::kFloat));
  auto status = at::empty({batch}, opts.dtype(at::kInt));

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> members(width);
    std::vector<int32_t> token(width);
    std::vector<float> q(width), p(width), scaled(width), sorted(width);
    std::vector<int> order(width);
    std::unique_ptr<bool[]> own(new bool[width]);
    for (int64_t b = begin; b < end; ++b) {
      int64_t* u_out = union_ids.mutable_data_ptr<int64_t>() + b * width;
      float* p_out = union_probs.mutable_data_ptr<float>() + b * width;
      // Steps 0 and 2: usable models and the ascending union of their candidates.
      int32_t row_status = 0;
      int size = 0;
      float w_total = 0.0f;
      for (int i = 0; i < n; ++i) {
        const int64_t* ids = topk_ids[i].const_data_ptr<int64_t>() + b * k;
        if (ids[0] < 0) {
          row_status |= 1 << i;
          continue;
        }
        w_total += static_cast<float>(weights[i]);
        const int32_t* tc = to_canon[i].const_data_ptr<int32_t>();
        for (int s = 0; s < k && ids[s] >= 0; ++s) {
          const int32_t c = tc[ids[s]];
          if (c >= 0 && c < num_canonical) members[size++] = c;
        }
      }
      std::sort(members.begin(), members.begin() + size);
      size = static_cast<int>(std::unique(members.begin(), members.begin() + size) - members.begin());
      std::fill(p.begin(), p.end(), 0.0f);
      // Steps 3-5 per model.
      for (int i = 0; i < n; ++i) {
        float* mp = model_probs.mutable_data_ptr<float>() + (i * batch + b) * width;
        std::fill(mp, mp + width, 0.0f);
        if (row_status & (1 << i)) continue;
        const int64_t vocab = logits[i].size(1);
        const int32_t* tc = to_canon[i].const_data_ptr<int32_t>();
        const int32_t* fc = from_canon[i].const_data_ptr<int32_t>();
        const float m = topk_logits[i].const_data_ptr<float>()[b * k];
        for (int j = 0; j < size; ++j) {
          const int32_t t = fc[members[j]];
          const bool present = t >= 0 && t < vocab;
          token[j] = present ? t : -1;
          own[j] = present && tc[t] == members[j];
          q[j] = present ? std::exp(logit_at(logits[i], b, t) - m) : 0.0f;
        }
        float total = 0.0f;
        for (int j = 0; j < size; ++j) {
          if (!owns_token(token.data(), own.get(), size, j)) q[j] = 0.0f;
          total += q[j];
        }
        const float w = w_total > 0 ? static_cast<float>(weights[i]) / w_total : 0.0f;
        for (int j = 0; j < size; ++j) {
          mp[j] = total > 0 ? q[j] / total : 0.0f;
          p[j] += w * mp[j];
        }
      }
      // Step 6.
      int choice = -1;
      if (w_total > 0 && size > 0) {
        if (temperature > 0) {
          const float log_max = std::log(*std::max_element(p.begin(), p.begin() + size));
          for (int j = 0; j < size; ++j) {
            scaled[j] = p[j] > 0 ? std::exp((std::log(p[j]) - log_max) / static_cast<float>(temperature)) : 0.0f;
            order[j] = j;
          }
          std::stable_sort(order.begin(), order.begin() + size, [&](int a, int c) { return scaled[a] > scaled[c]; });
          for (int j = 0; j < size; ++j) sorted[j] = scaled[order[j]];
          choice = order[nucleus_pick(sorted.data(), size, static_cast<float>(top_p), r.const_data_ptr<float>()[b])];
        } else {
          choice = static_cast<int>(std::max_element(p.begin(), p.begin() + size) - p.begin());
        }
      }
      for (int j = 0; j < width; ++j) {
        u_out[j] = j < size ? members[j] : -1;
        p_out[j] = j < size ? p[j] : 0.0f;
      }
      const int64_t chosen = choice >= 0 ? members[choice] : -1;
      next_canon.mutable_data_ptr<int64_t>()[b] = chosen;
      for (int i = 0; i < n; ++i) {
        next_ids.mutable_data_ptr<int64_t>()[i * batch + b] =
            chosen >= 0 ? from_canon[i].const_data_ptr<int32_t>()[chosen] : -1;
      }
      status.mutable_data_ptr<int32_t>()[b] = row_status;
    }
  });
  return {next_canon, next_ids, union_ids, union_probs, model_probs, status};
}

StepOutputs ensemble_step_cpu(at::TensorList logits, at::TensorList to_canon, at::TensorList from_canon, int64_t k,
                              at::ArrayRef<double> weights, double temperature, double top_p,
                              const std::optional<at::Tensor>& uniforms) {
  check_step_args(logits, to_canon, from_canon, k, weights, temperature, top_p, uniforms);
  auto stats = topk_many(logits, to_canon, k);
  std::vector<at::Tensor> ids, values, top1;
  for (auto& s : stats) {
    ids.push_back(s.ids);
    values.push_back(s.values);
    top1.push_back(s.top1);
  }
  auto [next_canon, next_ids, union_ids, union_probs, model_probs, status] =
      union_average_cpu(logits, to_canon, from_canon, ids, values, weights, temperature, top_p, uniforms);
  return {next_canon, next_ids, union_ids, union_probs, model_probs, at::stack(top1), status};
}

TORCH_LIBRARY_IMPL(unite_ext, CPU, m) {
  m.impl("topk_stats", &topk_stats_cpu);
  m.impl("union_average", &union_average_cpu);
  m.impl("ensemble_step", &ensemble_step_cpu);
}

}  // namespace unite_ext
