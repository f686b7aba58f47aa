// A CPU emulation of the device primitives in device.cuh, for testing fastclip's CUDA kernels without a GPU.
//
// Every CUDA thread of a block runs as an OS thread; __syncthreads is a block barrier and every warp-level primitive
// (shuffle, ldmatrix, mma) exchanges values through a per-warp buffer between two warp barriers, so all 32 lanes
// must reach it together, as on the GPU. Fragment layouts follow the PTX ISA (mma.m16n8k16 with .f16/.bf16 inputs
// and fp32 accumulators; ldmatrix.m8n8 .b16, with and without .trans). Shared memory starts filled with 0xFF bytes
// (NaN in both 16-bit types and in fp32) so reading what was never written shows up. cp.async copies are queued per
// thread and performed only when cp_async_wait lets their group complete, so a missing wait reads stale data.
// Blocks run one after another.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define FC_GLOBAL
#define FC_DEVICE inline
#define FC_LAUNCH_BOUNDS(n)
#define FC_LAUNCH_BOUNDS_MIN(n, m)
#define FC_DYNAMIC_SMEM(name) unsigned char* name = ::fc_emu::ctx().blk->smem
#ifndef __restrict__
#define __restrict__
#endif

namespace fc_emu {

// A failed check inside a kernel thread: report and stop the process (other threads wait at barriers, so there is
// no clean way to unwind one block).
[[noreturn]] inline void fatal(const char* what) {
  std::fprintf(stderr, "fastclip emulator: %s\n", what);
  std::fflush(stderr);
  std::_Exit(86);
}

struct Warp {
  std::barrier<> bar{32};
  uint32_t words[32][8];
  const void* ptrs[32];
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
};

struct Copy {
  void* dst;
  const void* src;
  bool pred;
};

struct Thread {
  fc::Dim3 thread, block, block_dim, grid_dim;
  Block* blk = nullptr;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
};

inline Thread& ctx() {
  thread_local Thread t;
  return t;
}
inline Warp& warp() { return *ctx().blk->warps[ctx().thread.x / 32]; }
inline unsigned lane() { return ctx().thread.x % 32; }

// Every lane publishes `n` words and returns after all lanes have; `read` then runs on the full exchange, and a
// second barrier keeps the buffer alive until every lane is done reading.
template <class Read>
inline void exchange(const uint32_t* mine, int n, const void* ptr, Read&& read) {
  Warp& w = warp();
  unsigned l = lane();
  for (int i = 0; i < n; ++i) w.words[l][i] = mine[i];
  w.ptrs[l] = ptr;
  w.bar.arrive_and_wait();
  read(w);
  w.bar.arrive_and_wait();
}

inline uint16_t load16(const void* p, int i) {
  uint16_t v;
  std::memcpy(&v, static_cast<const unsigned char*>(p) + 2 * i, 2);
  return v;
}
inline uint32_t pack16(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

// register i of lane l: matrix i, row l/4, cols 2(l%4)+{0,1}; trans: rows 2(l%4)+{0,1}, col l/4
inline void ldmatrix(uint32_t* r, int nmat, const void* row_ptr, bool trans) {
  uint32_t none[1] = {0};
  exchange(none, 0, row_ptr, [&](Warp& w) {
    unsigned l = lane();
    for (int m = 0; m < nmat; ++m) {
      if (!trans) {
        const void* row = w.ptrs[m * 8 + l / 4];
        r[m] = pack16(load16(row, 2 * (l % 4)), load16(row, 2 * (l % 4) + 1));
      } else {
        const void* r0 = w.ptrs[m * 8 + 2 * (l % 4)];
        const void* r1 = w.ptrs[m * 8 + 2 * (l % 4) + 1];
        r[m] = pack16(load16(r0, l / 4), load16(r1, l / 4));
      }
    }
  });
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = (h >> 15) & 1, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(float(man), -24);
  } else if (exp == 31) {
    v = man ? NAN : INFINITY;
  } else {
    v = std::ldexp(float(man | 0x400), int(exp) - 25);
  }
  return sign ? -v : v;
}
inline uint16_t float_to_f16(float f) {  // round to nearest even, overflow to inf
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint16_t sign = uint16_t((x >> 16) & 0x8000);
  if (std::isnan(f)) return sign | 0x7e00;
  float a = std::fabs(f);
  if (a >= 65520.0f) return sign | 0x7c00;
  if (a < std::ldexp(1.0f, -14)) {  // subnormal: multiple of 2^-24
    float q = std::nearbyint(std::ldexp(a, 24));  // default rounding mode: to nearest even
    return sign | uint16_t(q);
  }
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  float q = std::nearbyint(std::ldexp(a, 11 - e));  // 11 significant bits
  uint32_t mant = uint32_t(q);
  int exp = e - 1 + 15;
  if (mant == 2048) {
    mant = 1024;
    exp += 1;
  }
  if (exp >= 31) return sign | 0x7c00;
  return sign | uint16_t(exp << 10) | uint16_t(mant & 0x3ff);
}
inline float bf16_to_float(uint16_t h) {
  uint32_t x = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if (std::isnan(f)) return uint16_t((x >> 16) | 0x40);
  x += 0x7fff + ((x >> 16) & 1);
  return uint16_t(x >> 16);
}

template <bool kBf16>
inline void mma(float* d, const uint32_t* a, const uint32_t* b) {
  uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  auto elem = [](uint32_t word, int hi) {
    uint16_t h = hi ? uint16_t(word >> 16) : uint16_t(word & 0xffff);
    return kBf16 ? bf16_to_float(h) : f16_to_float(h);
  };
  exchange(mine, 6, nullptr, [&](Warp& w) {
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      int g = l / 4, t = l % 4;
      const uint32_t* wa = w.words[l];
      for (int j = 0; j < 2; ++j) {
        A[g][2 * t + j] = elem(wa[0], j);
        A[g + 8][2 * t + j] = elem(wa[1], j);
        A[g][2 * t + 8 + j] = elem(wa[2], j);
        A[g + 8][2 * t + 8 + j] = elem(wa[3], j);
        B[2 * t + j][g] = elem(wa[4], j);
        B[2 * t + 8 + j][g] = elem(wa[5], j);
      }
    }
    unsigned l = lane();
    int g = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      double acc = d[i];
      for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
      d[i] = float(acc);
    }
  });
}

inline void run_copy(const Copy& c) {
  if (c.pred)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
}

// Runs kernel(args...) over the grid, one block at a time, each block's threads as OS threads.
template <class F>
inline void run_grid(F&& body, fc::Dim3 grid, fc::Dim3 block, int smem_bytes) {
  unsigned nthreads = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1 || nthreads % 32 != 0 || nthreads == 0 || nthreads > 1024)
    throw std::invalid_argument("emulated launch: blockDim must be (32k, 1, 1) with k in 1..32");
  if (smem_bytes > 227 * 1024) throw std::invalid_argument("emulated launch: more than 227 KB of shared memory");
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk;
        blk.bar = std::make_unique<std::barrier<>>(nthreads);
        for (unsigned w = 0; w < nthreads / 32; ++w) blk.warps.push_back(std::make_unique<Warp>());
        blk.smem_storage.assign(size_t(smem_bytes) + 128, 0xFF);
        blk.smem = blk.smem_storage.data() + (128 - reinterpret_cast<uintptr_t>(blk.smem_storage.data()) % 128) % 128;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < nthreads; ++t) {
          threads.emplace_back([&, t] {
            Thread& th = ctx();
            th.thread = {t, 0, 0};
            th.block = {bx, by, bz};
            th.block_dim = block;
            th.grid_dim = grid;
            th.blk = &blk;
            th.groups.clear();
            th.open.clear();
            body();
            if (!th.open.empty() || !th.groups.empty()) fatal("a thread exited with cp.async copies never waited for");
          });
        }
        for (auto& th : threads) th.join();
      }
}

}  // namespace fc_emu

#define threadIdx (::fc_emu::ctx().thread)
#define blockIdx (::fc_emu::ctx().block)
#define blockDim (::fc_emu::ctx().block_dim)
#define gridDim (::fc_emu::ctx().grid_dim)

namespace fc {

using Stream = void*;
using Error = int;
constexpr Error kSuccess = 0;
inline const char* error_string(Error) { return "emulated launch failed"; }

FC_DEVICE void sync_threads() { ::fc_emu::ctx().blk->bar->arrive_and_wait(); }
FC_DEVICE int lane_id() { return int(threadIdx.x & 31); }
FC_DEVICE int warp_id() { return int(threadIdx.x >> 5); }

FC_DEVICE float shfl_xor(float v, int mask) {
  uint32_t mine[1];
  std::memcpy(mine, &v, 4);
  float out = 0.f;
  ::fc_emu::exchange(mine, 1, nullptr, [&](::fc_emu::Warp& w) {
    std::memcpy(&out, &w.words[::fc_emu::lane() ^ unsigned(mask)][0], 4);
  });
  return out;
}

FC_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ::fc_emu::ldmatrix(r, 4, p, false); }
FC_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ::fc_emu::ldmatrix(r, 4, p, true); }
FC_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* p) { ::fc_emu::ldmatrix(r, 2, p, false); }
FC_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { ::fc_emu::ldmatrix(r, 2, p, true); }

template <class T>
FC_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::fc_emu::mma<std::is_same<T, Bf16>::value>(d, a, b);
}

FC_DEVICE void cp_async_16(void* smem, const void* gmem, bool pred) {
  auto& th = ::fc_emu::ctx();
  auto* s = static_cast<unsigned char*>(smem);
  if (s < th.blk->smem || s + 16 > th.blk->smem + th.blk->smem_storage.size() - 128 ||
      (reinterpret_cast<uintptr_t>(smem) % 16) != 0 || (pred && reinterpret_cast<uintptr_t>(gmem) % 16 != 0))
    ::fc_emu::fatal("cp_async_16: shared address outside the block's buffer, or a misaligned address");
  th.open.push_back({smem, gmem, pred});
}
FC_DEVICE void cp_async_commit() {
  auto& th = ::fc_emu::ctx();
  th.groups.push_back(std::move(th.open));
  th.open.clear();
}
template <int N>
FC_DEVICE void cp_async_wait() {
  auto& th = ::fc_emu::ctx();
  while (th.groups.size() > size_t(N)) {
    for (auto& c : th.groups.front()) ::fc_emu::run_copy(c);
    th.groups.erase(th.groups.begin());
  }
}

FC_DEVICE float exp2_approx(float x) { return std::exp2(x); }
FC_DEVICE float log2_approx(float x) { return std::log2(x); }

FC_DEVICE float atomic_add(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
FC_DEVICE unsigned long long atomic_cas(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  std::atomic_ref<unsigned long long>(*p).compare_exchange_strong(cmp, v);
  return cmp;  // the old value, as atomicCAS returns
}
FC_DEVICE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
FC_DEVICE uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

template <class T>
struct Cvt;
template <>
struct Cvt<Fp16> {
  static uint16_t to_bits(float x) { return ::fc_emu::float_to_f16(x); }
  static float to_float(uint16_t b) { return ::fc_emu::f16_to_float(b); }
  static uint32_t pack2(float lo, float hi) { return ::fc_emu::pack16(to_bits(lo), to_bits(hi)); }
};
template <>
struct Cvt<Bf16> {
  static uint16_t to_bits(float x) { return ::fc_emu::float_to_bf16(x); }
  static float to_float(uint16_t b) { return ::fc_emu::bf16_to_float(b); }
  static uint32_t pack2(float lo, float hi) { return ::fc_emu::pack16(to_bits(lo), to_bits(hi)); }
};

template <class... KArgs, class... Args>
inline Error launch(void (*kernel)(KArgs...), Dim3 grid, Dim3 block, int smem_bytes, Stream,
                    Args&&... args) {
  ::fc_emu::run_grid([&] { kernel(static_cast<KArgs>(args)...); }, grid, block, smem_bytes);
  return kSuccess;
}

}  // namespace fc
