// Pieces shared by the flash attention forward (flash_fwd.cuh) and backward (flash_bwd.cuh) kernels.
#pragma once

#include "../common/device.cuh"
#include "attention.h"

namespace fastclip {
namespace attn_detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

struct alignas(16) Vec16 {  // 16 bytes moved by one load/store
  uint32_t x, y, z, w;
};

// Asynchronously copies rows [0, ROWS) x cols [0, D_PAD) of a (row_stride)-strided 16-bit tile into shared memory
// (row pitch LD elements); rows >= rows_valid and cols >= d are zero-filled without reading global memory.
template <int ROWS, int D_PAD, int LD, int NTHREADS>
FC_DEVICE void load_tile_async(uint16_t* s, const uint16_t* g, int64_t row_stride, int rows_valid, int d, int tid,
                               const uint16_t* any_valid) {
  // Thread tid copies column chunk (tid % CPR2) of rows tid / CPR2 + i * RSTEP, where CPR2 >= D_PAD / 8 is a power
  // of two (chunks >= D_PAD / 8 are no-ops): per-thread addresses then advance by a constant, which keeps ptxas from
  // holding one 64-bit address per unrolled copy across the main loops.
  constexpr int CPR = D_PAD / 8;
  constexpr int CPR2 = CPR <= 4 ? 4 : CPR <= 8 ? 8 : 16;
  constexpr int RSTEP = NTHREADS / CPR2;
  static_assert(CPR <= 16 && NTHREADS % CPR2 == 0 && ROWS % RSTEP == 0, "tile copy layout");
  const int r0 = tid / CPR2, k = (tid % CPR2) * 8;
  if (CPR2 != CPR && k >= D_PAD) return;
  const bool col_ok = k < d;
  const uint16_t* src = g + r0 * row_stride + k;
  const int64_t step = RSTEP * row_stride;
  uint16_t* dst = s + r0 * LD + k;
#pragma unroll
  for (int i = 0; i < ROWS / RSTEP; ++i) {
    const bool pred = col_ok && r0 + i * RSTEP < rows_valid;
    fc::cp_async_16(dst + i * RSTEP * LD, pred ? src : any_valid, pred);
    src += step;
  }
}

inline int pad_head_dim(int d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : 128; }

inline bool strides_ok(const AttnStrides& s) { return s.b % 8 == 0 && s.s % 8 == 0 && s.h % 8 == 0; }

// Checks shared by both directions; nullptr when fine.
inline const char* check_fwd_params(const AttnFwdParams& p) {
  if (p.batch < 1 || p.heads < 1 || p.sq < 1 || p.sk < 1)
    return "fastclip flash attention: batch, heads, seq_q and seq_k must be positive";
  if (p.d < 32 || p.d > 128 || p.d % 8 != 0)
    return "fastclip flash attention: head dim must be a multiple of 8 in [32, 128]";
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.o == nullptr || p.lse == nullptr)
    return "fastclip flash attention: null q, k, v, o or lse pointer";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.o))
    return "fastclip flash attention: q, k, v and o must be 16-byte aligned";
  if (!strides_ok(p.q_str) || !strides_ok(p.k_str) || !strides_ok(p.v_str) || !strides_ok(p.o_str))
    return "fastclip flash attention: batch, seq and head strides must be multiples of 8 elements";
  if (!(p.softmax_scale == p.softmax_scale)) return "fastclip flash attention: softmax_scale is NaN";
  if (p.key_padding != nullptr && p.key_padding_stride < p.sk && p.batch > 1)
    return "fastclip flash attention: key_padding_stride must be >= seq_k";
  if (int64_t(p.batch) * p.heads > 2147483647LL || (int64_t(p.sq) + 63) / 64 > 2147483647LL)
    return "fastclip flash attention: grid too large";
  return nullptr;
}

}  // namespace attn_detail
}  // namespace fastclip
