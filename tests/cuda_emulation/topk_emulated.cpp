// The CUDA top-k stage (csrc/topk_cuda.cuh: both warp lists, the partial and the finalize kernels) run on
// the CPU under the warp emulator, against a reference written from SPEC.md steps 0-1: a sort of every
// row. Random rows over many vocabulary sizes, one to three models per launch, k (1 to 64, also k > V),
// ties, -inf, NaN and empty rows, float32 and bfloat16 (whose 8-wide vectors meet rows at every alignment).
//   topk_emulated SEED     exit status 0 when every row matches; prints each mismatch
#include "warp_emulator.h"

#include <cstdio>
#include <random>
#include <string>

// bfloat16 as the kernels see it: the upper 16 bits of a float.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float to_float_bits(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}
inline __nv_bfloat16 to_bfloat16(float v) {
  uint32_t wide;
  std::memcpy(&wide, &v, sizeof v);
  return {static_cast<uint16_t>(wide >> 16)};
}

namespace unite_ext {
inline float to_float(__nv_bfloat16 v) { return to_float_bits(v.bits); }
}  // namespace unite_ext

#include "topk_cuda.cuh"

namespace unite_ext {
namespace {

struct Expected {
  std::vector<int64_t> ids;
  std::vector<float> logits;
  float top1;
};

// SPEC.md steps 0-1 for one row, in double where it sums.
Expected expected_topk(const std::vector<float>& row, const std::vector<int32_t>& to_canon, int k) {
  bool bad = false;
  float max = -INFINITY;
  std::vector<std::pair<float, int64_t>> tokens;
  for (size_t t = 0; t < row.size(); ++t) {
    const float v = row[t];
    bad |= std::isnan(v) || v == INFINITY;
    if (v > max) max = v;
    if (std::isfinite(v) && to_canon[t] >= 0) tokens.push_back({v, static_cast<int64_t>(t)});
  }
  double sum = 0.0;
  for (float v : row) {
    if (std::isfinite(v)) sum += std::exp(static_cast<double>(v) - max);
  }
  std::sort(tokens.begin(), tokens.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  const bool usable = !bad && !tokens.empty();
  Expected e;
  for (int p = 0; p < k; ++p) {
    const bool kept = usable && p < static_cast<int>(tokens.size());
    e.ids.push_back(kept ? tokens[p].second : -1);
    e.logits.push_back(kept ? tokens[p].first : -INFINITY);
  }
  e.top1 = usable ? static_cast<float>(std::exp(static_cast<double>(tokens[0].first) - max) / sum) : 0.0f;
  return e;
}

template <typename T>
T element(float v);
template <>
float element<float>(float v) {
  return v;
}
template <>
__nv_bfloat16 element<__nv_bfloat16>(float v) {
  return to_bfloat16(v);
}

// One call of the top-k stage as launch_topk_with runs it for models of one dtype: one partial launch
// over every model's chunks, then one finalize block per (row, model). Returns the number of (row, model)
// results that differ from the reference.
template <typename T, class List>
int check_case(std::mt19937& gen, const std::vector<int64_t>& vocabs, int batch, int k, int64_t chunk_elems,
               const char* name) {
  std::uniform_real_distribution<float> uniform(-4.0f, 4.0f);
  const int n = static_cast<int>(vocabs.size());
  const int pattern = static_cast<int>(gen() % 3);  // 0: uniform, 1: a few distinct values (ties), 2: runs
  std::vector<std::vector<int32_t>> to_canon(n);
  std::vector<std::vector<T>> logits(n);
  std::vector<std::vector<std::vector<float>>> rows(n);  // what the kernels read, as floats
  std::vector<std::vector<float>> workspaces(n);
  PartialArgs<T> partial{};
  FinalizeArgs finalize{};
  std::vector<std::vector<int64_t>> ids(n, std::vector<int64_t>(static_cast<size_t>(batch) * k));
  std::vector<std::vector<float>> values(n, std::vector<float>(static_cast<size_t>(batch) * k));
  std::vector<std::vector<float>> top1(n, std::vector<float>(batch));
  int chunks_so_far = 0;
  for (int m = 0; m < n; ++m) {
    const int64_t vocab = vocabs[m];
    to_canon[m].resize(vocab);
    for (auto& c : to_canon[m]) c = gen() % 7 == 0 ? -1 : static_cast<int32_t>(gen() % 1000);
    logits[m].resize(static_cast<size_t>(batch) * vocab);
    rows[m].assign(batch, std::vector<float>(vocab));
    for (int b = 0; b < batch; ++b) {
      auto& row = rows[m][b];
      for (int64_t t = 0; t < vocab; ++t) {
        float v = pattern == 0 ? uniform(gen) : pattern == 1 ? static_cast<float>(gen() % 6) : (t % 97) * 0.25f;
        row[t] = gen() % 13 == 0 ? -INFINITY : v;
      }
      if ((b + m) % 3 == 2) row[gen() % vocab] = gen() % 2 ? NAN : INFINITY;  // the model is left out
      if ((b + m) % 5 == 4) std::fill(row.begin(), row.end(), -INFINITY);  // no finite logit
      for (int64_t t = 0; t < vocab; ++t) {
        logits[m][b * vocab + t] = element<T>(row[t]);
        row[t] = to_float(logits[m][b * vocab + t]);
      }
    }
    const int64_t chunks = (vocab + chunk_elems - 1) / chunk_elems;
    const int64_t slots = batch * chunks;
    workspaces[m].resize(slots * (2 * k + 3));
    float* w = workspaces[m].data();
    const PartialView part{w,
                           reinterpret_cast<int32_t*>(w + slots * k),
                           w + slots * 2 * k,
                           w + slots * (2 * k + 1),
                           reinterpret_cast<int32_t*>(w + slots * (2 * k + 2)),
                           static_cast<int>(chunks)};
    partial.model[partial.n++] = PartialModel<T>{logits[m].data(), vocab, to_canon[m].data(), part, chunks_so_far};
    chunks_so_far += static_cast<int>(chunks);
    finalize.partial[m] = part;
    finalize.out[m] = TopkView{ids[m].data(), values[m].data(), top1[m].data()};
  }
  for (int b = 0; b < batch; ++b) {
    for (int c = 0; c < chunks_so_far; ++c) {
      emu::run_block(kThreads, dim3{static_cast<unsigned>(c), static_cast<unsigned>(b), 1},
                     [&] { topk_partial_kernel<T, List>(partial, k, chunk_elems); });
    }
  }
  for (int m = 0; m < n; ++m) {
    for (int b = 0; b < batch; ++b) {
      emu::run_block(kThreads, dim3{static_cast<unsigned>(b), static_cast<unsigned>(m), 1},
                     [&] { topk_finalize_kernel<List>(finalize, k); });
    }
  }

  int failures = 0;
  for (int m = 0; m < n; ++m) {
    for (int b = 0; b < batch; ++b) {
      const Expected e = expected_topk(rows[m][b], to_canon[m], k);
      bool same = std::fabs(e.top1 - top1[m][b]) <= 1e-5f * std::max(1.0f, e.top1);
      for (int p = 0; p < k; ++p) same &= e.ids[p] == ids[m][b * k + p] && e.logits[p] == values[m][b * k + p];
      if (same) continue;
      ++failures;
      std::printf("MISMATCH %s model %d of %d, vocab=%lld k=%d chunk=%lld pattern=%d row=%d: top1 %g (expected %g)\n",
                  name, m, n, static_cast<long long>(vocabs[m]), k, static_cast<long long>(chunk_elems), pattern, b,
                  top1[m][b], e.top1);
      for (int p = 0; p < k; ++p) {
        std::printf("  %2d: %lld %g (expected %lld %g)\n", p, static_cast<long long>(ids[m][b * k + p]),
                    values[m][b * k + p], static_cast<long long>(e.ids[p]), e.logits[p]);
      }
    }
  }
  return failures;
}

// `vocab` for the first model; with probability 1/2 one or two more models of other sizes share the launch.
template <typename T>
int check_both_lists(std::mt19937& gen, int64_t vocab, int k, const char* dtype) {
  std::vector<int64_t> vocabs{vocab};
  for (int extra = static_cast<int>(gen() % 4); extra > 1; --extra) vocabs.push_back(1 + gen() % 6000);
  const int batch = 1 + static_cast<int>(gen() % 4);
  const int64_t chunk_elems = gen() % 2 ? 2048 : 4096;  // the launcher's chunks are multiples of 2048
  const std::string insertion = std::string("insertion/") + dtype, bitonic = std::string("bitonic/") + dtype;
  if (k <= 32) {
    return check_case<T, InsertionWarpList<1>>(gen, vocabs, batch, k, chunk_elems, insertion.c_str()) +
           check_case<T, BitonicWarpList<1>>(gen, vocabs, batch, k, chunk_elems, bitonic.c_str());
  }
  return check_case<T, InsertionWarpList<2>>(gen, vocabs, batch, k, chunk_elems, insertion.c_str()) +
         check_case<T, BitonicWarpList<2>>(gen, vocabs, batch, k, chunk_elems, bitonic.c_str());
}

}  // namespace
}  // namespace unite_ext

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SEED\n", argv[0]);
    return 2;
  }
  std::mt19937 gen(static_cast<unsigned>(std::stoul(argv[1])));
  int failures = 0, cases = 0;
  for (int64_t vocab : {1, 7, 33, 100, 1000, 4097, 9001}) {
    for (int k : {1, 2, 10, 31, 32, 33, 50, 64}) {
      failures += unite_ext::check_both_lists<float>(gen, vocab, k, "float32");
      failures += unite_ext::check_both_lists<__nv_bfloat16>(gen, vocab, k, "bfloat16");
      cases += 4;
    }
  }
  std::printf("%d cases, %d rows differ from the reference\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
