// The CUDA ensemble step (csrc/step_cuda.cuh) run on the CPU under the warp emulator, launched as
// csrc/step_cuda.cu launches it: one partial top-k launch over every model's chunks, the finalize kernel,
// the union kernel. tests/test_cuda_emulated.py writes the inputs and compares the outputs with the CPU op
// and the float64 oracle.
//   step_emulated IN OUT [IN OUT ...]
// IN (little-endian): int64 n, batch, k, num_canonical, dtype (0 float32, 1 bfloat16, 2 float16),
// chunk_elems, has_uniforms; float64 temperature, top_p; int64 vocab per model; float64 weight per model
// (normalised); per model the logits [batch, vocab] in the dtype, then per model to_canon int32 [vocab],
// then per model from_canon int32 [num_canonical]; float32 uniforms [batch] if has_uniforms.
// OUT: next_canon int64 [B], next_ids int64 [N, B], union_ids int64 [B, L], union_probs float32 [B, L],
// model_probs float32 [N, B, L], top1_prob float32 [N, B], status int32 [B], with L = N * k.
#include "warp_emulator.h"

#include <fstream>
#include <string>

// The 16-bit float types as the kernels see them: their bits, and a conversion to float.
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half {
  uint16_t bits;
};

namespace unite_ext {
inline float to_float(__nv_bfloat16 v) {
  const uint32_t wide = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}
inline float to_float(__half v) {
  const uint32_t sign = (v.bits & 0x8000u) << 16, exponent = (v.bits >> 10) & 0x1fu, mantissa = v.bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)  // inf, NaN
                                       : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
}  // namespace unite_ext

#include "step_cuda.cuh"

namespace unite_ext {
namespace {

struct Case {
  int64_t n, batch, k, num_canonical, dtype, chunk_elems, has_uniforms;
  double temperature, top_p;
  std::vector<int64_t> vocab;
  std::vector<double> weight;
  std::vector<std::vector<unsigned char>> logits;  // raw bytes
  std::vector<std::vector<int32_t>> to_canon, from_canon;
  std::vector<float> uniforms;
};

template <typename T>
void read_into(std::ifstream& in, std::vector<T>& out, size_t count) {
  out.resize(count);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(count * sizeof(T)));
}

template <typename T>
T read_one(std::ifstream& in) {
  T v;
  in.read(reinterpret_cast<char*>(&v), sizeof v);
  return v;
}

Case read_case(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  Case c;
  for (int64_t* field : {&c.n, &c.batch, &c.k, &c.num_canonical, &c.dtype, &c.chunk_elems, &c.has_uniforms}) {
    *field = read_one<int64_t>(in);
  }
  c.temperature = read_one<double>(in);
  c.top_p = read_one<double>(in);
  read_into(in, c.vocab, c.n);
  read_into(in, c.weight, c.n);
  const size_t element = c.dtype == 0 ? 4 : 2;
  c.logits.resize(c.n);
  c.to_canon.resize(c.n);
  c.from_canon.resize(c.n);
  for (int64_t i = 0; i < c.n; ++i) read_into(in, c.logits[i], c.batch * c.vocab[i] * element);
  for (int64_t i = 0; i < c.n; ++i) read_into(in, c.to_canon[i], c.vocab[i]);
  for (int64_t i = 0; i < c.n; ++i) read_into(in, c.from_canon[i], c.num_canonical);
  if (c.has_uniforms) read_into(in, c.uniforms, c.batch);
  if (!in) {
    std::fprintf(stderr, "step_emulated: %s is shorter than its header says\n", path.c_str());
    std::exit(2);
  }
  return c;
}

struct Outputs {
  std::vector<int64_t> next_canon, next_ids, union_ids, topk_ids;
  std::vector<float> union_probs, model_probs, top1, topk_logits;
  std::vector<int32_t> status;
};

// launch_topk_with: the partial results of every model in one workspace, one partial launch over every
// model's chunks (all models of a case share its dtype), then one finalize block per (row, model).
template <typename T, class List>
void run_topk(const Case& c, Outputs& out) {
  const int64_t n = c.n, batch = c.batch, k = c.k;
  std::vector<int64_t> model_chunks(n);
  int chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    model_chunks[i] = (c.vocab[i] + c.chunk_elems - 1) / c.chunk_elems;
    chunks += static_cast<int>(model_chunks[i]);
  }
  std::vector<float> workspace(partial_floats(batch * chunks, k));
  FinalizeArgs finalize{};
  lay_out_partials(workspace.data(), static_cast<int>(n), model_chunks.data(), batch, k, finalize.partial);
  PartialArgs<T> partial{};
  int first_chunk = 0;
  for (int64_t i = 0; i < n; ++i) {
    partial.model[partial.n++] = PartialModel<T>{reinterpret_cast<const T*>(c.logits[i].data()), c.vocab[i],
                                                 c.to_canon[i].data(), finalize.partial[i], first_chunk};
    first_chunk += static_cast<int>(model_chunks[i]);
    finalize.out[i] = TopkView{out.topk_ids.data() + i * batch * k, out.topk_logits.data() + i * batch * k,
                               out.top1.data() + i * batch};
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int chunk = 0; chunk < chunks; ++chunk) {
      emu::run_block(kThreads, dim3{static_cast<unsigned>(chunk), static_cast<unsigned>(b), 1},
                     [&] { topk_partial_kernel<T, List>(partial, static_cast<int>(k), c.chunk_elems); });
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t b = 0; b < batch; ++b) {
      emu::run_block(kThreads, dim3{static_cast<unsigned>(b), static_cast<unsigned>(i), 1},
                     [&] { topk_finalize_kernel<List>(finalize, static_cast<int>(k)); });
    }
  }
}

template <typename T>
void run_topk_with_list(const Case& c, Outputs& out) {
  with_warp_list(c.k, [&](auto warp_list) { run_topk<T, decltype(warp_list)>(c, out); });
}

// launch_union_average: one block per row.
void run_union(const Case& c, Outputs& out) {
  const int64_t n = c.n, batch = c.batch, k = c.k;
  UnionArgs args{};
  for (int64_t i = 0; i < n; ++i) {
    args.model[i] = ModelView{c.logits[i].data(), c.vocab[i], static_cast<LogitType>(c.dtype),
                              c.to_canon[i].data(), c.from_canon[i].data()};
    args.topk_ids[i] = out.topk_ids.data() + i * batch * k;
    args.topk_logits[i] = out.topk_logits.data() + i * batch * k;
    args.weight[i] = static_cast<float>(c.weight[i]);
  }
  args.n = static_cast<int>(n);
  args.k = static_cast<int>(k);
  args.num_canonical = c.num_canonical;
  args.batch = batch;
  args.temperature = static_cast<float>(c.temperature);
  args.top_p = static_cast<float>(c.top_p);
  args.uniforms = c.has_uniforms ? c.uniforms.data() : nullptr;
  args.next_canon = out.next_canon.data();
  args.next_ids = out.next_ids.data();
  args.union_ids = out.union_ids.data();
  args.union_probs = out.union_probs.data();
  args.model_probs = out.model_probs.data();
  args.status = out.status.data();
  // Exactly the shared memory the launcher requests, then a guard band that no block may write to.
  constexpr size_t kGuardBytes = 256;
  constexpr unsigned char kGuard = 0xA5;
  const size_t shared_bytes = union_smem_bytes(args.n, args.n * args.k);
  emu::dynamic_shared.assign(shared_bytes + kGuardBytes, kGuard);
  for (int64_t b = 0; b < batch; ++b) {
    emu::run_block(kThreads, dim3{static_cast<unsigned>(b), 1, 1}, [&] { union_average_kernel(args); });
    for (size_t i = shared_bytes; i < emu::dynamic_shared.size(); ++i) {
      if (emu::dynamic_shared[i] != kGuard) {
        std::fprintf(stderr, "step_emulated: the union kernel wrote past its %zu bytes of shared memory\n",
                     shared_bytes);
        std::exit(1);
      }
    }
  }
}

template <typename T>
void write_all(std::ofstream& file, const std::vector<T>& values) {
  file.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * sizeof(T)));
}

void run_case(const std::string& in_path, const std::string& out_path) {
  const Case c = read_case(in_path);
  const int64_t n = c.n, batch = c.batch, width = c.n * c.k;
  Outputs out;
  out.topk_ids.resize(n * batch * c.k);
  out.topk_logits.resize(n * batch * c.k);
  out.top1.resize(n * batch);
  out.next_canon.resize(batch);
  out.next_ids.resize(n * batch);
  out.union_ids.resize(batch * width);
  out.union_probs.resize(batch * width);
  out.model_probs.resize(n * batch * width);
  out.status.resize(batch);
  switch (c.dtype) {
    case 1: run_topk_with_list<__nv_bfloat16>(c, out); break;
    case 2: run_topk_with_list<__half>(c, out); break;
    default: run_topk_with_list<float>(c, out);
  }
  run_union(c, out);
  std::ofstream file(out_path, std::ios::binary);
  write_all(file, out.next_canon);
  write_all(file, out.next_ids);
  write_all(file, out.union_ids);
  write_all(file, out.union_probs);
  write_all(file, out.model_probs);
  write_all(file, out.top1);
  write_all(file, out.status);
}

}  // namespace
}  // namespace unite_ext

int main(int argc, char** argv) {
  if (argc < 3 || argc % 2 != 1) {
    std::fprintf(stderr, "usage: %s IN OUT [IN OUT ...]\n", argv[0]);
    return 2;
  }
  for (int a = 1; a < argc; a += 2) unite_ext::run_case(argv[a], argv[a + 1]);
  return 0;
}
