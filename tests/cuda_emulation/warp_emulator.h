// Runs CUDA device code on the CPU, one block at a time: each thread of the block is a fiber, and a warp
// intrinsic (shuffle, ballot, __syncwarp) or __syncthreads passes control to the next fiber that takes part
// until all have arrived, so warp-synchronous code runs lane by lane and computes what it computes on a
// GPU. It checks logic (ranks, ties, merges, indexing), not timing or the memory model: compute-sanitizer on
// a GPU does. Include it before the device code: it defines the CUDA keywords and intrinsics that code uses.
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};

namespace emu {

struct Fiber {
  ucontext_t start;  // used once, to enter the fiber on its own stack
  jmp_buf resume;    // where it last gave up control
  bool started = false, done = false;
};

constexpr size_t kStackBytes = 256 * 1024;
inline std::vector<Fiber> fibers;
inline std::vector<std::unique_ptr<char[]>> stacks;  // allocated once, reused by every block
inline jmp_buf all_done;
inline int current = 0;
inline dim3 block_index;
inline std::function<void()> kernel;
inline std::vector<unsigned char> dynamic_shared;  // sized by the caller before a launch that uses it

// Passes control from the current fiber to fiber `next`; returns when some fiber passes it back.
// _setjmp/_longjmp rather than swapcontext: no signal-mask system call per switch.
inline void switch_to(int next) {
  if (next == current || _setjmp(fibers[current].resume)) return;
  current = next;
  if (!fibers[next].started) {
    fibers[next].started = true;
    setcontext(&fibers[next].start);
  }
  _longjmp(fibers[next].resume, 1);
}

// The fibers [first, first + count) meet here; a waiting fiber hands control to the next of them.
struct Barrier {
  int first = 0, count = 0, arrived = 0, generation = 0;
  void wait() {
    const int entered = generation;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      return;
    }
    int next = current;
    while (generation == entered) {
      int tries = 0;
      do {
        next = first + (next - first + 1) % count;
      } while (fibers[next].done && ++tries < count);
      if (fibers[next].done) {
        std::fprintf(stderr, "warp emulator: a barrier waits for threads that have exited\n");
        std::abort();
      }
      switch_to(next);
    }
  }
};

inline std::vector<Barrier> warp_barriers;
inline Barrier block_barrier;
inline std::vector<uint64_t> exchange;  // one slot per thread, for shuffles and ballots

inline void enter() {
  kernel();
  fibers[current].done = true;
  for (int i = 1; i < static_cast<int>(fibers.size()); ++i) {
    const int next = (current + i) % static_cast<int>(fibers.size());
    if (!fibers[next].done) switch_to(next);  // does not come back: nothing waits for a finished fiber
  }
  _longjmp(all_done, 1);
}

// Runs `body` as the block `index` of `threads` threads (a multiple of 32) and returns when all are done.
inline void run_block(int threads, dim3 index, std::function<void()> body) {
  block_index = index;
  kernel = std::move(body);
  fibers.assign(threads, Fiber{});
  warp_barriers.clear();
  for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(Barrier{32 * w, 32});
  block_barrier = Barrier{0, threads};
  exchange.assign(threads, 0);
  while (stacks.size() < fibers.size()) stacks.emplace_back(new char[kStackBytes]);
  for (size_t i = 0; i < fibers.size(); ++i) {
    Fiber& f = fibers[i];
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = stacks[i].get();
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;
    makecontext(&f.start, enter, 0);
  }
  if (_setjmp(all_done)) return;
  current = 0;
  fibers[0].started = true;
  setcontext(&fibers[0].start);
}

inline int lane() { return current & 31; }
inline Barrier& warp_barrier() { return warp_barriers[current >> 5]; }

// Every lane of the warp publishes `v`; returns lane `src`'s.
template <typename T>
T exchange_with(T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t));
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  exchange[current] = bits;
  warp_barrier().wait();
  bits = exchange[(current & ~31) + src];
  warp_barrier().wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

struct ThreadIndex {
  unsigned x, y, z;
};
inline ThreadIndex emulated_thread_index() { return {static_cast<unsigned>(emu::current), 0, 0}; }
inline ThreadIndex emulated_block_index() { return {emu::block_index.x, emu::block_index.y, emu::block_index.z}; }
#define threadIdx emulated_thread_index()
#define blockIdx emulated_block_index()
#define blockDim (ThreadIndex{static_cast<unsigned>(emu::fibers.size()), 1, 1})
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block at a time: a function-level static is the block's shared memory
#define __restrict__ __restrict

#define UNITE_DYNAMIC_SHARED(name) unsigned char* name = emu::dynamic_shared.data()

template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::exchange_with(v, src & 31);
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return emu::exchange_with(v, emu::lane() ^ mask);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const int src = emu::lane() - static_cast<int>(delta);
  return emu::exchange_with(v, src >= 0 ? src : emu::lane());
}
inline unsigned __ballot_sync(unsigned, bool predicate) {
  emu::exchange[emu::current] = predicate;
  emu::warp_barrier().wait();
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) out |= static_cast<unsigned>(emu::exchange[(emu::current & ~31) + l] != 0) << l;
  emu::warp_barrier().wait();
  return out;
}
inline bool __any_sync(unsigned mask, bool predicate) { return __ballot_sync(mask, predicate) != 0; }
inline void __syncwarp() { emu::warp_barrier().wait(); }
inline void __syncthreads() { emu::block_barrier.wait(); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline float __expf(float x) { return std::exp(x); }
inline int atomicAdd(int* address, int value) {  // fibers never run at the same time
  const int old = *address;
  *address += value;
  return old;
}
template <typename T>
T __ldcs(const T* p) {
  return *p;
}
using std::max;
using std::min;
