// Pieces of the step's semantics (SPEC.md section 2) shared by the CPU and CUDA kernels, so that both
// backends decide ties, duplicates and sampling with the same code.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define UNITE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UNITE_HOST_DEVICE inline
#endif

namespace unite_ext {

constexpr int kMaxK = 64;
// Per-model parameters are passed to the CUDA kernels by value; status holds one bit per model.
constexpr int kMaxModels = 16;

// Step 1 order: larger logit first, then the smaller token id.
UNITE_HOST_DEVICE bool ranks_before(float a_value, int64_t a_id, float b_value, int64_t b_id) {
  return a_value > b_value || (a_value == b_value && a_id < b_id);
}

// Step 3: several union entries may map to one model token (token[j], -1 when missing). Only one
// receives its probability: the entry that is the model's own token (own[j]), else the first (=
// smallest canonical id, as the union is ascending).
UNITE_HOST_DEVICE bool owns_token(const int32_t* token, const bool* own, int union_size, int j) {
  const int32_t t = token[j];
  if (t < 0) return false;
  if (own[j]) return true;
  for (int o = 0; o < union_size; ++o) {
    if (o != j && token[o] == t && (own[o] || o < j)) return false;
  }
  return true;
}

// Step 6 (sampling): `weight` holds P(u) ordered by P descending then canonical id. Returns the
// position of the chosen candidate: the nucleus is the shortest prefix whose cumulative mass reaches
// top_p of the total, and the choice is its first entry whose cumulative mass exceeds r * (its mass).
// Cumulative sums accumulate in double and compare in float, like torch.cumsum on the CPU.
UNITE_HOST_DEVICE int nucleus_pick(const float* weight, int n, float top_p, float r) {
  double acc = 0.0;
  for (int j = 0; j < n; ++j) acc += weight[j];
  const float limit = top_p * static_cast<float>(acc);
  int last = n - 1;
  acc = 0.0;
  float mass = 0.0f;
  for (int j = 0; j < n; ++j) {
    acc += weight[j];
    mass = static_cast<float>(acc);
    if (mass >= limit) {
      last = j;
      break;
    }
  }
  const float target = r * mass;
  acc = 0.0;
  for (int j = 0; j < last; ++j) {
    acc += weight[j];
    if (static_cast<float>(acc) > target) return j;
  }
  return last;
}

}  // namespace unite_ext
