// Flash attention forward (FlashAttention-2 on mma.sync m16n8k16): templated kernel and launcher.
//
// Grid (B*H, ceil(sq / 64)), 4 warps; warp w owns query rows 16w..16w+15 of the block's 64. The Q tile's A fragments
// stay in registers (the tile passes through K's second buffer first); key/value tiles of 64 rows are double-buffered
// in shared memory by cp.async (row pitch D_PAD + 8 elements, so the 8 rows of an ldmatrix hit 8 distinct 16-byte
// bank groups). Per key block:
//   S = Q K^T (K rows are the B fragments, plain ldmatrix), x = S * scale * log2(e), masked entries -inf
//   (key >= sk, key padding, causal key > query; causal blocks wholly past the diagonal are never visited, and
//   16-key slices past sk or past a warp's last row skip their mmas),
//   online softmax in base 2 (quad shuffles), P packed from the accumulators straight into A fragments,
//   O += P V (V rows through ldmatrix .trans).
// A row whose keys are all masked keeps max = -inf: exponents are taken against 0 instead, so it accumulates
// nothing, and the epilogue writes O = 0, lse = -inf. O goes out through shared memory in 16-byte stores.
// Head dims d <= D_PAD: columns >= d are zero-filled by the loads and never stored.
#pragma once

#include "flash_common.cuh"

namespace fastclip {
namespace attn_detail {

template <int D_PAD>
struct FwdCfg {
  static constexpr int BM = 64, BN = 64, WARPS = 4, THREADS = 128;
  static constexpr int LD = D_PAD + 8;
  static constexpr int SMEM = 4 * BN * LD * 2;  // 2 x K, 2 x V; Q (and the O staging) alias K's second buffer
  static_assert(BM <= BN, "the Q tile lives in a K buffer");
};

template <class T, int D_PAD>
FC_GLOBAL void FC_LAUNCH_BOUNDS_MIN(128, 1) flash_fwd_kernel(const AttnFwdParams p) {
  using C = FwdCfg<D_PAD>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, THREADS = C::THREADS;
  constexpr int KT = D_PAD / 16;  // k16 steps of Q K^T
  constexpr int NT = BN / 8;      // n8 tiles of S
  constexpr int DT = D_PAD / 8;   // n8 tiles of O
  FC_DYNAMIC_SMEM(smem);
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem);  // 2 buffers
  uint16_t* sV = sK + 2 * BN * LD;                     // 2 buffers
  uint16_t* sQ = sK + BN * LD;  // K buffer 1: read into registers before the first prefetch overwrites it

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int bh = int(blockIdx.x), m_block = int(blockIdx.y);
  const int b = bh / p.heads, h = bh % p.heads;
  const int sq = p.sq, sk = p.sk, d = p.d;
  const int m0 = m_block * BM;
  const uint16_t* q = p.q + b * p.q_str.b + h * p.q_str.h + int64_t(m0) * p.q_str.s;
  const uint16_t* k = p.k + b * p.k_str.b + h * p.k_str.h;
  const uint16_t* v = p.v + b * p.v_str.b + h * p.v_str.h;
  const uint8_t* kp = p.key_padding ? p.key_padding + b * p.key_padding_stride : nullptr;
  const float scale_log2 = p.softmax_scale * kLog2e;

  int n_blocks = (sk + BN - 1) / BN;
  if (p.causal) {  // keys j <= last query row of the block
    const int last_row = (m0 + BM < sq ? m0 + BM : sq) - 1;
    const int nb = last_row / BN + 1;
    n_blocks = nb < n_blocks ? nb : n_blocks;
  }

  load_tile_async<BM, D_PAD, LD, THREADS>(sQ, q, p.q_str.s, sq - m0, d, tid, p.q);
  load_tile_async<BN, D_PAD, LD, THREADS>(sK, k, p.k_str.s, sk, d, tid, p.k);
  load_tile_async<BN, D_PAD, LD, THREADS>(sV, v, p.v_str.s, sk, d, tid, p.v);
  fc::cp_async_commit();

  float o[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};
  uint32_t qf[KT][4];
  const int row_lo = m0 + warp * 16 + g;  // this thread's rows: row_lo, row_lo + 8

  for (int n = 0; n < n_blocks; ++n) {
    if (n == 0) {  // Q fragments to registers, then K buffer 1 is free for the prefetch
      fc::cp_async_wait<0>();
      fc::sync_threads();
#pragma unroll
      for (int kk = 0; kk < KT; ++kk)
        fc::ldmatrix_x4(qf[kk], sQ + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
      fc::sync_threads();
    }
    if (n + 1 < n_blocks) {
      const int nxt = (n + 1) * BN, buf = (n + 1) & 1;
      load_tile_async<BN, D_PAD, LD, THREADS>(sK + buf * BN * LD, k + int64_t(nxt) * p.k_str.s, p.k_str.s, sk - nxt,
                                              d, tid, p.k);
      load_tile_async<BN, D_PAD, LD, THREADS>(sV + buf * BN * LD, v + int64_t(nxt) * p.v_str.s, p.v_str.s, sk - nxt,
                                              d, tid, p.v);
    }
    fc::cp_async_commit();
    fc::cp_async_wait<1>();
    fc::sync_threads();
    const uint16_t* kb = sK + (n & 1) * BN * LD;
    const uint16_t* vb = sV + (n & 1) * BN * LD;

    // 16-key slices [0, slice_end) of this block that can matter to this warp (warp-uniform): keys < sk and, when
    // causal, keys <= the warp's last row. Skipped slices keep S = 0 and are masked below, so P = 0 there.
    const int n0 = n * BN;
    int slice_end = sk - n0 < BN ? sk - n0 : BN;
    if (p.causal) {
      const int lim = m0 + warp * 16 + 16 - n0;
      slice_end = lim < slice_end ? lim : slice_end;
    }

    // S = Q K^T
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        if (np * 16 >= slice_end) continue;
        uint32_t r[4];
        fc::ldmatrix_x4(r, kb + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
        fc::mma_16816<T>(s[2 * np], qf[kk], b0);
        fc::mma_16816<T>(s[2 * np + 1], qf[kk], b1);
      }
    }

    // scale to base 2 and mask
    const bool need_mask = n0 + BN > sk || kp != nullptr || (p.causal && n0 + BN - 1 > m0);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (need_mask) {
          const int col = n0 + nt * 8 + 2 * t + (e & 1), row = row_lo + (e >> 1) * 8;
          const bool masked = col >= sk || (kp != nullptr && kp[col] != 0) || (p.causal && col > row);
          if (masked) x = -kInf;
        }
        s[nt][e] = x;
      }

    // online softmax
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -kInf;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fc::warp_reduce_max4(mx);
      const float m_new = fmaxf(row_max[r], mx);
      const float m_ref = m_new == -kInf ? 0.f : m_new;  // a row with nothing yet: exp2(-inf - 0) = 0
      const float alpha = fc::exp2_approx(row_max[r] - m_ref);
      row_max[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[nt][2 * r] = fc::exp2_approx(s[nt][2 * r] - m_ref);
        s[nt][2 * r + 1] = fc::exp2_approx(s[nt][2 * r + 1] - m_ref);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      if (kk * 16 >= slice_end) continue;  // P = 0 there
      const uint32_t a[4] = {fc::Cvt<T>::pack2(s[2 * kk][0], s[2 * kk][1]),
                             fc::Cvt<T>::pack2(s[2 * kk][2], s[2 * kk][3]),
                             fc::Cvt<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             fc::Cvt<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t r[4];
        fc::ldmatrix_x4_trans(r, vb + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + dp * 16 + (lane >> 4) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
        fc::mma_16816<T>(o[2 * dp], a, b0);
        fc::mma_16816<T>(o[2 * dp + 1], a, b1);
      }
    }
    fc::sync_threads();  // every warp is done with this buffer before the next prefetch overwrites it
  }
  fc::cp_async_wait<0>();

  // epilogue: normalise, lse, O through shared memory (each warp writes and later reads back only its own rows of
  // sQ, but the block-wide barrier below orders the cooperative copy)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = fc::warp_reduce_sum4(row_sum[r]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row_lo + 8 * r;
    if (t == 0 && row < sq)
      p.lse[int64_t(bh) * sq + row] = l > 0.f ? (row_max[r] + fc::log2_approx(l)) * kLn2 : -kInf;
    uint16_t* srow = sQ + (warp * 16 + g + 8 * r) * LD;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *reinterpret_cast<uint32_t*>(srow + dt * 8 + 2 * t) = fc::Cvt<T>::pack2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
  }
  fc::sync_threads();
  uint16_t* out = p.o + b * p.o_str.b + h * p.o_str.h + int64_t(m0) * p.o_str.s;
  constexpr int CPR = D_PAD / 8;
#pragma unroll
  for (int i = 0; i < BM * CPR / THREADS; ++i) {
    const int c = tid + i * THREADS, r = c / CPR, col = (c % CPR) * 8;
    if (m0 + r < sq && col < d)
      *reinterpret_cast<Vec16*>(out + r * p.o_str.s + col) = *reinterpret_cast<const Vec16*>(sQ + r * LD + col);
  }
}

template <class T, int D_PAD>
fc::Error flash_fwd_run(const AttnFwdParams& p, void* stream) {
  using C = FwdCfg<D_PAD>;
  const fc::Dim3 grid{unsigned(p.batch * p.heads), unsigned((p.sq + C::BM - 1) / C::BM), 1};
  return fc::launch(flash_fwd_kernel<T, D_PAD>, grid, fc::Dim3{unsigned(C::THREADS), 1, 1}, C::SMEM,
                    static_cast<fc::Stream>(stream), p);
}

template <class T>
const char* flash_fwd_launch(const AttnFwdParams& p, void* stream) {
  if (const char* e = check_fwd_params(p)) return e;
  if ((p.sq + FwdCfg<32>::BM - 1) / FwdCfg<32>::BM > 65535) return "fastclip flash attention: seq_q too long";
  fc::Error err;
  switch (pad_head_dim(p.d)) {
    case 32: err = flash_fwd_run<T, 32>(p, stream); break;
    case 64: err = flash_fwd_run<T, 64>(p, stream); break;
    case 96: err = flash_fwd_run<T, 96>(p, stream); break;
    default: err = flash_fwd_run<T, 128>(p, stream); break;
  }
  return fc::launch_result(err);
}

}  // namespace attn_detail
}  // namespace fastclip
