// Device code of the CUDA step (SPEC.md section 2): the warp lists, the block merge, the two top-k kernels
// and the union kernel; step_cuda.cu launches them. A header of its own so that tests/cuda_emulation can
// also run it on the CPU, under a warp emulator, where no GPU is present.
#pragma once

#include <climits>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "step_common.h"

namespace unite_ext {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kEmptyId = INT_MAX;  // id of an empty top-k slot (ranks after every real token)

__device__ __forceinline__ float to_float(float v) { return v; }
#ifdef __CUDACC__
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Declares the block's dynamic shared memory as `name` (the warp emulator defines its own). Declared in
// the kernel itself: behind an accessor function the union kernel spilled a register.
#define UNITE_DYNAMIC_SHARED(name) extern __shared__ unsigned char name[]
#endif

// The largest of v, or NaN if any is NaN (fmaxf would drop it): one test per vector then finds NaN and +inf.
template <int N>
__device__ __forceinline__ float max_keeping_nan(const float (&v)[N]) {
  float m = v[0];
#pragma unroll
  for (int j = 1; j < N; ++j) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("max.NaN.f32 %0, %0, %1;" : "+f"(m) : "f"(v[j]));
#else
    m = m != m || v[j] != v[j] ? m + v[j] : fmaxf(m, v[j]);
#endif
  }
  return m;
}

// Whether a row holding `v` cannot vote (SPEC.md section 2: NaN or +inf logits).
__device__ __forceinline__ bool unusable_logit(float v) { return v != v || v == INFINITY; }

// Programmatic dependent launch (sm_90 and later; no-ops elsewhere). The finalize and union kernels are
// launched so that they may start while the kernel before them on the stream finishes (step_cuda.cu,
// launch_overlapping): they call wait_for_previous_kernel before any global read or write (their outputs may
// reuse memory the kernel before still reads). The two top-k kernels call allow_next_kernel as they start,
// so that the next kernel's launch overlaps their run.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Running (max, sum of exp(x - max)) with -inf as the empty state.
struct SoftmaxStats {
  float max = -INFINITY;
  float sum = 0.0f;

  // Takes in a few values whose maximum (max_keeping_nan) is `top`, with one exponential each. NaN and
  // +inf make the row unusable (the caller flags them), so what they do to the sum does not matter.
  template <int N>
  __device__ __forceinline__ void add(const float (&v)[N], float top) {
    if (top > max) {
      sum *= __expf(max - top);  // 0 while max is -inf
      max = top;
    }
    if (max == -INFINITY) return;  // only -inf so far: no mass
    // exp(v - max) as 2^(v log2(e) - max log2(e)): one fused multiply-add and one exp2 per value.
    constexpr float kLog2e = 1.4426950408889634f;
    const float shift = max * kLog2e;
#pragma unroll
    for (int j = 0; j < N; ++j) sum += exp2f(fmaf(v[j], kLog2e, -shift));
  }

  __device__ __forceinline__ void merge(float other_max, float other_sum) {
    if (other_max == -INFINITY) return;
    if (max == -INFINITY) {
      max = other_max;
      sum = other_sum;
      return;
    }
    const float m = fmaxf(max, other_max);
    sum = sum * __expf(max - m) + other_sum * __expf(other_max - m);
    max = m;
  }
};

// Exchanges entries with lane ^ mask; keeps the better of the two where keep_better is set, else the worse.
__device__ __forceinline__ void exchange(float& v, int32_t& t, int mask, bool keep_better) {
  const float other_v = __shfl_xor_sync(kFullMask, v, mask);
  const int32_t other_t = __shfl_xor_sync(kFullMask, t, mask);
  if (ranks_before(other_v, other_t, v, t) == keep_better) {
    v = other_v;
    t = other_t;
  }
}

// Sorts a bitonic sequence held one entry per lane, best first.
__device__ __forceinline__ void bitonic_merge(float& v, int32_t& t) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) exchange(v, t, mask, (lane & mask) == 0);
}

// Sorts any 32 entries held one per lane, best first: runs of `size` alternate direction until the last.
__device__ __forceinline__ void bitonic_sort(float& v, int32_t& t) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int mask = size >> 1; mask > 0; mask >>= 1) {
      exchange(v, t, mask, ((lane & mask) == 0) == ((lane & size) == 0));
    }
  }
}

// A warp's top-k list, sorted by ranks_before over positions s * 32 + lane (lane 0 of slot 0 the best).
// Every lane holds the k-th entry as the admission threshold, so most candidates are rejected without
// communication. Admitted candidates are gathered in shared memory (a ballot and a prefix count) and each
// full batch of 32 is sorted by a bitonic network and merged in. Exposes: init, admits, push
// (warp-collective; `active` lanes offer (v, t)), merge_sorted (a batch sorted best first across the lanes,
// e.g. a slot of another list), finish (takes in what is pending).
template <int kSlots>
struct WarpList {
  static_assert(kSlots == 1 || kSlots == 2, "k is at most 64");
  static constexpr int slots = kSlots;
  float value[kSlots];
  int32_t id[kSlots];
  float threshold_value;
  int32_t threshold_id;
  int k;
  float* pending_value;  // this warp's 2 * 32 shared-memory slots for candidates not yet merged in
  int32_t* pending_id;
  int pending;              // warp-uniform
  const int32_t* to_canon;  // the model's table, where candidates are tokens not yet looked up (else null)

  __device__ __forceinline__ void init(int k_, float* buffer_value, int32_t* buffer_id, const int32_t* table) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      value[s] = -INFINITY;
      id[s] = kEmptyId;
    }
    threshold_value = -INFINITY;
    threshold_id = kEmptyId;
    k = k_;
    pending_value = buffer_value;
    pending_id = buffer_id;
    pending = 0;
    to_canon = table;
  }

  __device__ __forceinline__ bool admits(float v, int32_t t) const {
    return ranks_before(v, t, threshold_value, threshold_id);
  }

  __device__ __forceinline__ void update_threshold() {
    const int last = k - 1;
    // Selects, not a loop over the slots: a loop here kept the list out of registers (a stack frame).
    const bool in_second = kSlots == 2 && last >= 32;
    const float kth_value = in_second ? value[kSlots - 1] : value[0];
    const int32_t kth_id = in_second ? id[kSlots - 1] : id[0];
    threshold_value = __shfl_sync(kFullMask, kth_value, last & 31);
    threshold_id = __shfl_sync(kFullMask, kth_id, last & 31);
  }

  // Raises the threshold to the k-th largest of the lanes' `best` (each lane's best candidate, -inf if
  // none; never NaN), with the largest id so that entries equal to it still enter: k distinct candidates
  // reach it, so the k-th entry of the warp's final list does too. Called on the first vectors, it spares
  // the sorts of the candidates that only a list still filling would admit. (A threshold is a lower bound:
  // the next update_threshold may lower it again, which admits more but drops nothing.) One slot only.
  __device__ __forceinline__ void raise_threshold(float best) {
    if constexpr (kSlots == 1) {
      int32_t lane = threadIdx.x & 31;
      bitonic_sort(best, lane);
      const float kth = __shfl_sync(kFullMask, best, k - 1);
      if (kth > threshold_value) {
        threshold_value = kth;
        threshold_id = kEmptyId;
      }
    }
  }

  // Appends the active lanes' candidates; every 32 of them are sorted and merged in. Warp-uniform control.
  __device__ __forceinline__ void push(bool active, float v, int32_t t) {
    const int lane = threadIdx.x & 31;
    const unsigned ballot = __ballot_sync(kFullMask, active);
    if (ballot == 0) return;
    if (active) {
      const int slot = pending + __popc(ballot & ((1u << lane) - 1u));
      pending_value[slot] = v;
      pending_id[slot] = t;
    }
    pending += __popc(ballot);
    if (pending < 32) return;
    __syncwarp();
    float bv = pending_value[lane];
    int32_t bt = pending_id[lane];
    pending -= 32;
    const bool moves = lane < pending;
    const float rest_v = moves ? pending_value[32 + lane] : 0.0f;
    const int32_t rest_t = moves ? pending_id[32 + lane] : 0;
    __syncwarp();
    if (moves) {
      pending_value[lane] = rest_v;
      pending_id[lane] = rest_t;
    }
    __syncwarp();
    sort_and_merge(bv, bt);
  }

  __device__ __forceinline__ void finish() {
    if (pending == 0) return;
    const int lane = threadIdx.x & 31;
    __syncwarp();
    float bv = lane < pending ? pending_value[lane] : -INFINITY;
    int32_t bt = lane < pending ? pending_id[lane] : kEmptyId;
    pending = 0;
    __syncwarp();
    sort_and_merge(bv, bt);
  }

  // Takes in a batch of gathered candidates, one per lane. A token without a canonical id cannot be a
  // candidate (SPEC.md section 2): the table is read here, once per batch of 32, rather than for every
  // vector that holds a candidate.
  __device__ __forceinline__ void sort_and_merge(float v, int32_t t) {
    if (to_canon != nullptr && t != kEmptyId && to_canon[t] < 0) {
      v = -INFINITY;
      t = kEmptyId;
    }
    bitonic_sort(v, t);
    merge_sorted(v, t);
  }

  // The list's last slot against the batch reversed: the better of each pair are the best 32 of both, as
  // a bitonic sequence. With two slots, the first against the (sorted) second reversed splits the 64 best
  // into two bitonic halves, the better half first.
  __device__ __forceinline__ void merge_sorted(float v, int32_t t) {
    const int lane = threadIdx.x & 31;
    constexpr int last = kSlots - 1;
    const float reversed_v = __shfl_sync(kFullMask, v, 31 - lane);
    const int32_t reversed_t = __shfl_sync(kFullMask, t, 31 - lane);
    if (ranks_before(reversed_v, reversed_t, value[last], id[last])) {
      value[last] = reversed_v;
      id[last] = reversed_t;
    }
    bitonic_merge(value[last], id[last]);
    if constexpr (kSlots == 2) {
      const float second_v = __shfl_sync(kFullMask, value[1], 31 - lane);
      const int32_t second_t = __shfl_sync(kFullMask, id[1], 31 - lane);
      const bool second_first = ranks_before(second_v, second_t, value[0], id[0]);
      value[1] = second_first ? value[0] : second_v;
      id[1] = second_first ? id[0] : second_t;
      value[0] = second_first ? second_v : value[0];
      id[0] = second_first ? second_t : id[0];
      bitonic_merge(value[0], id[0]);
      bitonic_merge(value[1], id[1]);
    }
    update_threshold();
  }
};

// Calls f(List{}) with the warp list a launch uses: one slot per lane for k <= 32, two for k <= 64.
template <class F>
void with_warp_list(int64_t k, F&& f) {
  k <= 32 ? f(WarpList<1>{}) : f(WarpList<2>{});
}

struct BlockScratch {
  float value[kWarps][kMaxK];
  int32_t id[kWarps][kMaxK];
  float max[kWarps];
  float sum[kWarps];
  int bad[kWarps];
  float pending_value[kWarps][64];  // the warp lists' candidates waiting to be merged in
  int32_t pending_id[kWarps][64];
};

template <class List>
__device__ __forceinline__ void init_list(List& top, int k, BlockScratch& scratch, const int32_t* to_canon) {
  const int warp = threadIdx.x >> 5;
  top.init(k, scratch.pending_value[warp], scratch.pending_id[warp], to_canon);
}

// Writes a warp's first k entries to value[0..k) and id[0..k).
template <class List>
__device__ __forceinline__ void store_entries(const List& top, float* value, int32_t* id) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int s = 0; s < List::slots; ++s) {
    const int p = s * 32 + lane;
    if (p < top.k) {
      value[p] = top.value[s];
      id[p] = top.id[s];
    }
  }
}

// Writes a warp's first k entries and statistics to its row of the scratch.
template <class List>
__device__ __forceinline__ void store_list(const List& top, const SoftmaxStats& stats, BlockScratch& scratch) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  store_entries(top, scratch.value[warp], scratch.id[warp]);
  if (lane == 0) {
    scratch.max[warp] = stats.max;
    scratch.sum[warp] = stats.sum;
  }
}

// Merges every warp's list and statistics into warp 0 (its `top` and `stats`; `bad` in all threads),
// pairwise in log2(kWarps) rounds.
template <class List>
__device__ void block_merge(List& top, SoftmaxStats& stats, bool& bad, BlockScratch& scratch) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  top.finish();
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_max = __shfl_xor_sync(kFullMask, stats.max, offset);
    const float other_sum = __shfl_xor_sync(kFullMask, stats.sum, offset);
    stats.merge(other_max, other_sum);
  }
  const bool warp_bad = __any_sync(kFullMask, bad);
  store_list(top, stats, scratch);
  if (lane == 0) scratch.bad[warp] = warp_bad;
  __syncthreads();
  bad = false;
  for (int w = 0; w < kWarps; ++w) bad |= scratch.bad[w] != 0;
  for (int half = kWarps / 2; half > 0; half >>= 1) {
    if (warp < half) {
      const int other = warp + half;
#pragma unroll
      for (int s = 0; s < List::slots; ++s) {
        const int p = s * 32 + lane;
        top.merge_sorted(p < top.k ? scratch.value[other][p] : -INFINITY, p < top.k ? scratch.id[other][p] : kEmptyId);
      }
      stats.merge(scratch.max[other], scratch.sum[other]);
      if (half > 1) store_list(top, stats, scratch);
    }
    __syncthreads();
  }
}

// Partial results of one model: per (row, chunk) a top-k list and softmax statistics.
struct PartialView {
  float* value;   // [B, chunks, k]
  int32_t* id;    // [B, chunks, k]
  float* max;     // [B, chunks]
  float* sum;     // [B, chunks]
  int32_t* bad;   // [B, chunks]
  int chunks;
};

// Floats of the workspace holding `slots` (row, chunk) partial results: per slot k values, k ids, max,
// sum, bad.
inline int64_t partial_floats(int64_t slots, int64_t k) { return slots * (2 * k + 3); }

// Lays out the partial results of n models one after another from `w` (partial_floats(batch * the models'
// chunks, k) floats): model i has batch * chunks[i] slots.
inline void lay_out_partials(float* w, int n, const int64_t* chunks, int64_t batch, int64_t k, PartialView* out) {
  for (int i = 0; i < n; ++i) {
    const int64_t slots = batch * chunks[i];
    out[i] = PartialView{w,
                         reinterpret_cast<int32_t*>(w + slots * k),
                         w + slots * 2 * k,
                         w + slots * (2 * k + 1),
                         reinterpret_cast<int32_t*>(w + slots * (2 * k + 2)),
                         static_cast<int>(chunks[i])};
    w += partial_floats(slots, k);
  }
}

// One model's share of a partial launch: its logits [B, vocab] (rows contiguous), its table, where its
// results go, and the first of its chunks in the launch (blockIdx.x counts the chunks of every model).
template <typename T>
struct PartialModel {
  const T* logits;
  int64_t vocab;
  const int32_t* to_canon;
  PartialView out;
  int first_chunk;
};

// Every model with logits of type T in one launch, so that their blocks run side by side (at B = 1 one
// model's chunks fill only part of the GPU).
template <typename T>
struct PartialArgs {
  PartialModel<T> model[kMaxModels];
  int n;
};

// At least 5 blocks per SM (at most 48 registers): the 576 blocks of B = 64 rows of the Qwen2 + Llama-3
// vocabularies then run in one wave on an H100's 132 SMs (at 64 registers, 4 per SM, there would be two).
template <typename T, class List>
__global__ void __launch_bounds__(kThreads, 5) topk_partial_kernel(PartialArgs<T> args, int k, int64_t chunk_elems) {
  allow_next_kernel();
  int m = 0;
  while (m + 1 < args.n && static_cast<int>(blockIdx.x) >= args.model[m + 1].first_chunk) ++m;
  const T* __restrict__ logits = args.model[m].logits;
  const int64_t vocab = args.model[m].vocab;
  const int32_t* __restrict__ to_canon = args.model[m].to_canon;
  const PartialView out = args.model[m].out;
  const int b = blockIdx.y, chunk = static_cast<int>(blockIdx.x) - args.model[m].first_chunk;
  constexpr int kVec = 16 / sizeof(T);
  __shared__ BlockScratch scratch;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const T* row = logits + static_cast<int64_t>(b) * vocab;
  const int64_t lo = chunk * chunk_elems;
  const int64_t hi = min(vocab, lo + chunk_elems);

  List top;
  init_list(top, k, scratch, to_canon);
  SoftmaxStats stats;
  bool bad = false;

  // Takes in a lane's consecutive logits v[j] of tokens first + j (-inf where the lane has none); with
  // `raise`, first raises the list's threshold from them. Warp-collective.
  auto consume = [&](const auto& v, int64_t first, bool raise) {
    constexpr int n = sizeof(v) / sizeof(float);
    const float vector_max = max_keeping_nan(v);
    bad |= unusable_logit(vector_max);
    stats.add(v, vector_max);
    // No entry can enter the list unless the largest reaches the threshold (with a NaN the row is unusable).
    if (!__any_sync(kFullMask, vector_max >= top.threshold_value)) return;
    bool candidate[n];
#pragma unroll
    for (int j = 0; j < n; ++j) {
      candidate[j] = v[j] > -INFINITY && v[j] < INFINITY && top.admits(v[j], static_cast<int32_t>(first + j));
    }
    if (raise) {  // from tokens with a canonical id only; their lookups issued together
      float best = -INFINITY;
#pragma unroll
      for (int j = 0; j < n; ++j) best = candidate[j] && to_canon[first + j] >= 0 ? fmaxf(best, v[j]) : best;
      top.raise_threshold(best);
    }
#pragma unroll
    for (int j = 0; j < n; ++j) {
      const int32_t t = static_cast<int32_t>(first + j);
      top.push(candidate[j] && top.admits(v[j], t), v[j], t);
    }
  };

  // The unaligned head and tail of the chunk (fewer than kVec elements each) go to warp 0.
  const uintptr_t address = reinterpret_cast<uintptr_t>(row + lo);
  const int64_t head = min(hi - lo, static_cast<int64_t>(((16 - address % 16) % 16) / sizeof(T)));
  const int64_t body_begin = lo + head;
  const int64_t body_end = body_begin + (hi - body_begin) / kVec * kVec;
  if (warp == 0) {
    const int64_t head_t = lo + lane;
    const float head_value[1] = {lane < head ? to_float(row[head_t]) : -INFINITY};
    consume(head_value, head_t, false);
    const int64_t tail_t = body_end + lane;
    const float tail_value[1] = {tail_t < hi && lane < kVec ? to_float(row[tail_t]) : -INFINITY};
    consume(tail_value, tail_t, false);
  }

  union Vector {
    uint4 raw;
    T elem[kVec];
  };
  const int64_t stride = static_cast<int64_t>(kThreads) * kVec;
  // Each lane's vector for the next round is loaded before this round's work, so that two loads are in
  // flight per lane: the loop is otherwise bound by the memory latency when rows are long.
  auto load = [&](int64_t first, Vector& vec) {
    if (first < body_end) vec.raw = __ldcs(reinterpret_cast<const uint4*>(row + first));
  };
  const int64_t warp_begin = body_begin + static_cast<int64_t>(warp) * 32 * kVec;
  Vector next;
  load(warp_begin + lane * kVec, next);
  for (int64_t base = warp_begin; base < body_end; base += stride) {
    const int64_t first = base + lane * kVec;
    const bool in_range = first < body_end;
    const Vector vec = next;
    load(first + stride, next);
    float v[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float x = to_float(vec.elem[j]);  // converted either way: a select, not a branch per entry
      v[j] = in_range ? x : -INFINITY;
    }
    consume(v, first, base == warp_begin);  // the threshold raised on the warp's first vectors
  }

  block_merge(top, stats, bad, scratch);
  if (warp == 0) {
    const int64_t slot = static_cast<int64_t>(b) * out.chunks + chunk;
    store_entries(top, out.value + slot * k, out.id + slot * k);
    if (lane == 0) {
      out.max[slot] = stats.max;
      out.sum[slot] = stats.sum;
      out.bad[slot] = bad;
    }
  }
}

struct TopkView {
  int64_t* ids;     // [B, k], -1 padded
  float* logits;    // [B, k], -inf padded
  float* top1;      // [B]
};

struct FinalizeArgs {
  PartialView partial[kMaxModels];
  TopkView out[kMaxModels];
};

// One block per (row, model): merges the chunks of that row.
template <class List>
__global__ void __launch_bounds__(kThreads) topk_finalize_kernel(FinalizeArgs args, int k) {
  allow_next_kernel();
  wait_for_previous_kernel();
  __shared__ BlockScratch scratch;
  const int b = blockIdx.x, model = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const PartialView part = args.partial[model];
  const int64_t first_slot = static_cast<int64_t>(b) * part.chunks;

  List top;
  init_list(top, k, scratch, nullptr);
  SoftmaxStats stats;
  bool bad = false;
  for (int c = threadIdx.x; c < part.chunks; c += kThreads) {
    stats.merge(part.max[first_slot + c], part.sum[first_slot + c]);
    bad |= part.bad[first_slot + c] != 0;
  }
  const int count = part.chunks * k;
  for (int base = warp * 32; base < count; base += kThreads) {
    const int e = base + lane;
    const float v = e < count ? part.value[first_slot * k + e] : -INFINITY;
    const int32_t t = e < count ? part.id[first_slot * k + e] : kEmptyId;
    top.push(v > -INFINITY && top.admits(v, t), v, t);
  }
  block_merge(top, stats, bad, scratch);
  if (warp == 0) {
    const TopkView out = args.out[model];
    const float best = __shfl_sync(kFullMask, top.value[0], 0);
    const bool usable = !bad && best > -INFINITY;
#pragma unroll
    for (int s = 0; s < List::slots; ++s) {
      const int p = s * 32 + lane;
      if (p < k) {
        const bool kept = usable && top.value[s] > -INFINITY;
        out.ids[static_cast<int64_t>(b) * k + p] = kept ? top.id[s] : -1;
        out.logits[static_cast<int64_t>(b) * k + p] = kept ? top.value[s] : -INFINITY;
      }
    }
    if (lane == 0) out.top1[b] = usable ? expf(best - stats.max) / stats.sum : 0.0f;
  }
}

// The union kernel reads each model's logits at a few tokens only, so it takes their type at run time.
enum class LogitType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

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

// Dynamic shared memory of union_average_kernel, for a union width L = n * k: 7 words per union slot (the
// union and the choice) and, for each model gathered in the same pass, 9 bytes per slot (its token, its
// q, whether the token is the model's own). As many models per pass as fit the default 48 KB.
constexpr size_t kUnionBytesPerSlot = 3 * sizeof(int32_t) + 3 * sizeof(float) + sizeof(int);
constexpr size_t kPassBytesPerSlot = sizeof(int32_t) + sizeof(float) + sizeof(bool);
constexpr size_t kUnionSharedBytes = 48 * 1024;

constexpr int union_models_per_pass(int n, int width) {
  const size_t room = (kUnionSharedBytes - width * kUnionBytesPerSlot) / (width * kPassBytesPerSlot);
  return room < static_cast<size_t>(n) ? static_cast<int>(room) : n;
}

constexpr size_t union_smem_bytes(int n, int width) {
  return width * (kUnionBytesPerSlot + union_models_per_pass(n, width) * kPassBytesPerSlot);
}
static_assert(union_models_per_pass(kMaxModels, kMaxModels * kMaxK) >= 1 &&
                  union_smem_bytes(kMaxModels, kMaxModels * kMaxK) <= kUnionSharedBytes,
              "the union must fit the default shared memory");

// One block per row. The minimum of one block per SM lets ptxas use the registers it needs (left to its
// default it held the kernel to 48 and spilled).
__global__ void __launch_bounds__(kThreads, 1) union_average_kernel(UnionArgs args) {
  wait_for_previous_kernel();
  UNITE_DYNAMIC_SHARED(smem);
  const int width = args.n * args.k;
  const int pass = union_models_per_pass(args.n, width);
  int32_t* candidate = reinterpret_cast<int32_t*>(smem);
  int32_t* first = candidate + width;
  int32_t* members = first + width;
  float* p = reinterpret_cast<float*>(members + width);
  float* scaled = p + width;
  float* sorted = scaled + width;
  int* order = reinterpret_cast<int*>(sorted + width);
  int32_t* token = order + width;                            // [pass][width]
  float* q = reinterpret_cast<float*>(token + pass * width);  // [pass][width]
  bool* own = reinterpret_cast<bool*>(q + pass * width);      // [pass][width]
  __shared__ int size;
  __shared__ float total[kMaxModels];
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

  // Steps 3-5, `pass` models at a time (usually all): their gathers and sums run side by side. A model
  // left out of the row (status bit) gets q = 0, hence probabilities 0 and no share of p.
  for (int pass_first = 0; pass_first < args.n; pass_first += pass) {
    const int models = min(pass, args.n - pass_first);
    for (int e = threadIdx.x; e < models * union_size; e += blockDim.x) {
      const int g = e / union_size, j = e % union_size, i = pass_first + g;
      const ModelView m = args.model[i];
      const int32_t t = row_status & (1 << i) ? -1 : m.from_canon[members[j]];
      const bool present = t >= 0 && t < m.vocab;
      token[g * width + j] = present ? t : -1;
      own[g * width + j] = present && m.to_canon[t] == members[j];
      q[g * width + j] = present ? expf(load_logit(m, b, t) - args.topk_logits[i][b * k]) : 0.0f;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < models * union_size; e += blockDim.x) {
      const int g = e / union_size, j = e % union_size;
      if (!owns_token(token + g * width, own + g * width, union_size, j)) q[g * width + j] = 0.0f;
    }
    __syncthreads();
    if (threadIdx.x < models) {  // one thread per model, serial, in the CPU kernel's order
      float sum = 0.0f;
      for (int j = 0; j < union_size; ++j) sum += q[threadIdx.x * width + j];
      total[threadIdx.x] = sum;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
      for (int g = 0; g < models; ++g) {  // p accumulates model by model, as on the CPU
        const int i = pass_first + g;
        const float w = w_total > 0.0f ? args.weight[i] / w_total : 0.0f;
        const float prob = j < union_size && total[g] > 0.0f ? q[g * width + j] / total[g] : 0.0f;
        args.model_probs[(i * args.batch + b) * width + j] = prob;
        p[j] += w * prob;
      }
    }
    __syncthreads();
  }

  // Step 6: the largest p, the first (smallest canonical id) among equals (ranks_before over union
  // positions); warp 0, lane by lane then across the lanes.
  if (threadIdx.x < 32) {
    int best = -1;
    float best_p = 0.0f;
    for (int j = threadIdx.x; w_total > 0.0f && j < union_size; j += 32) {
      if (best < 0 || ranks_before(p[j], j, best_p, best)) {
        best = j;
        best_p = p[j];
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const int other = __shfl_xor_sync(kFullMask, best, offset);
      const float other_p = __shfl_xor_sync(kFullMask, best_p, offset);
      if (other >= 0 && (best < 0 || ranks_before(other_p, other, best_p, best))) {
        best = other;
        best_p = other_p;
      }
    }
    if (threadIdx.x == 0) choice = best;
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
      for (int o = 0; o < union_size; ++o) rank += ranks_before(scaled[o], o, scaled[j], j);
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

}  // namespace unite_ext
