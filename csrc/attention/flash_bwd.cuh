// Flash attention backward (FlashAttention-2 math on mma.sync m16n8k16): templated kernel and launcher.
//
// One thread block (4 warps) per (batch, head): CLIP's sequences are short (<= 257), so B*H blocks fill the GPU,
// and owning a whole (b, h) makes the backward deterministic without atomics:
//   1. delta_i = rowsum(dO_i * O_i) for every query row, into the workspace (a warp per row);
//   2. for each key block of BN = 64 keys (K, V tiles in shared memory), warp w owns keys 16w..16w+15 and keeps
//      dK, dV (16 x D_PAD, fp32) in registers; for each query block of BM rows (64 for D_PAD <= 64, else 32; Q, dO,
//      lse, delta double-buffered, cp.async), with the transposed products so that keys are the mma rows:
//        S^T = K Q^T, dP^T = V dO^T                       (Q, dO rows: plain ldmatrix B fragments)
//        P^T = exp2(S^T * scale * log2 e - lse_i log2 e), 0 where masked (key >= sk, padding, causal key > query,
//              query >= sq, or a query with lse = -inf)
//        dS^T = P^T (dP^T - delta_i)
//        dV += P^T dO, dK += dS^T Q                        (P^T, dS^T packed from accumulators into A fragments;
//                                                          dO, Q through ldmatrix .trans)
//        dS^T -> shared memory (16-bit), barrier, dQ_tile = dS K (warps split the tile's rows and columns)
//      (16-row slices that cannot contribute: queries >= sq, keys >= sk, or wholly above the causal diagonal, skip
//      their mmas; their P and dS are exactly 0 anyway)
//      dQ_tile is accumulated in fp32 in the workspace by the thread that owns each element, always the same thread
//      for every key block, in key block order: the first visiting key block stores, the last one converts and
//      writes dq. No atomics; the result is bitwise reproducible.
//   3. dK *= scale, written with dV at the end of each key block (zeros for keys no query sees).
// The workspace holds dq_acc (B*H, sq, d) fp32 and delta (B*H, sq) fp32, 256-byte aligned pieces.
#pragma once

#include "flash_common.cuh"

namespace fastclip {
namespace attn_detail {

template <int D_PAD>
struct BwdCfg {
  static constexpr int BN = 64, WARPS = 4, THREADS = 128;
  static constexpr int BM = D_PAD <= 64 ? 64 : D_PAD <= 96 ? 32 : 16;
  static constexpr int LD = D_PAD + 8, LDS = BM + 8;
  static constexpr int WM = BM / 16;        // row groups of the dQ tile
  static constexpr int WD = WARPS / WM;     // column parts of the dQ tile
  static constexpr int DQC = D_PAD / WD;    // columns per warp in dQ
  static constexpr int SMEM = (2 * BN + 4 * BM) * LD * 2 + BN * LDS * 2 + 4 * BM * 4;
  static_assert(DQC % 16 == 0, "dQ column part must be a multiple of 16");
};

inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }

inline size_t bwd_workspace_bytes(const AttnBwdParams& p) {
  const size_t rows = size_t(p.fwd.batch) * size_t(p.fwd.heads) * size_t(p.fwd.sq);
  return align256(rows * size_t(p.fwd.d) * 4) + align256(rows * 4);
}

// Query tile m of one (b, h) -> buffer buf: Q and dO by cp.async, lse (as lse * log2 e, +inf for a row that must
// contribute nothing) and delta by plain stores.
template <int BM, int D_PAD, int LD, int THREADS>
FC_DEVICE void bwd_load_query_tile(int m, int buf, uint16_t* sQ, uint16_t* sdO, float* sLse, float* sDelta,
                                   const uint16_t* q, int64_t q_rs, const uint16_t* dout, int64_t do_rs,
                                   const float* lse, const float* delta, int sq, int d, int tid,
                                   const uint16_t* q_any, const uint16_t* do_any) {
  const int r0 = m * BM;
  load_tile_async<BM, D_PAD, LD, THREADS>(sQ + buf * BM * LD, q + int64_t(r0) * q_rs, q_rs, sq - r0, d, tid, q_any);
  load_tile_async<BM, D_PAD, LD, THREADS>(sdO + buf * BM * LD, dout + int64_t(r0) * do_rs, do_rs, sq - r0, d, tid,
                                          do_any);
  for (int i = tid; i < BM; i += THREADS) {
    const int row = r0 + i;
    const float l = row < sq ? lse[row] : -kInf;
    sLse[buf * BM + i] = l == -kInf ? kInf : l * kLog2e;
    sDelta[buf * BM + i] = row < sq ? delta[row] : 0.f;
  }
}

template <class T, int D_PAD>
FC_GLOBAL void FC_LAUNCH_BOUNDS_MIN(128, 1) flash_bwd_kernel(const AttnBwdParams p, float* ws_dq, float* ws_delta) {
  using C = BwdCfg<D_PAD>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD, LDS = C::LDS, THREADS = C::THREADS;
  constexpr int KT = D_PAD / 16, DT = D_PAD / 8, MT = BM / 8, DQT = C::DQC / 8;
  FC_DYNAMIC_SMEM(smem);
  uint16_t* sK = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sV = sK + BN * LD;
  uint16_t* sQ = sV + BN * LD;       // 2 buffers
  uint16_t* sdO = sQ + 2 * BM * LD;  // 2 buffers
  uint16_t* sdS = sdO + 2 * BM * LD;  // dS^T: BN rows (keys) x BM (queries)
  float* sLse = reinterpret_cast<float*>(sdS + BN * LDS);  // 2 buffers: lse * log2(e), +inf = no contribution
  float* sDelta = sLse + 2 * BM;                            // 2 buffers

  const AttnFwdParams& f = p.fwd;
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int bh = int(blockIdx.x);
  const int b = bh / f.heads, h = bh % f.heads;
  const int sq = f.sq, sk = f.sk, d = f.d, H = f.heads;
  const uint16_t* q = f.q + b * f.q_str.b + h * f.q_str.h;
  const uint16_t* k = f.k + b * f.k_str.b + h * f.k_str.h;
  const uint16_t* v = f.v + b * f.v_str.b + h * f.v_str.h;
  const uint16_t* o = f.o + b * f.o_str.b + h * f.o_str.h;
  const uint16_t* dout = p.dout + b * p.dout_str.b + h * p.dout_str.h;
  const float* lse = f.lse + int64_t(bh) * sq;
  const uint8_t* kp = f.key_padding ? f.key_padding + b * f.key_padding_stride : nullptr;
  const float scale_log2 = f.softmax_scale * kLog2e;
  float* dq_acc = ws_dq + int64_t(bh) * sq * d;
  float* delta = ws_delta + int64_t(bh) * sq;
  const int64_t out_row = int64_t(H) * d;  // row stride of dq, dk, dv
  uint16_t* dq = p.dq + (int64_t(b) * sq * H + h) * d;
  uint16_t* dk = p.dk + (int64_t(b) * sk * H + h) * d;
  uint16_t* dv = p.dv + (int64_t(b) * sk * H + h) * d;

  // 1. delta = rowsum(dO * O)
  for (int row = warp; row < sq; row += THREADS / 32) {
    float acc = 0.f;
    for (int c = 2 * lane; c < d; c += 64) {
      const uint32_t ow = *reinterpret_cast<const uint32_t*>(o + row * f.o_str.s + c);
      const uint32_t dw = *reinterpret_cast<const uint32_t*>(dout + row * p.dout_str.s + c);
      acc += fc::Cvt<T>::to_float(uint16_t(ow & 0xffff)) * fc::Cvt<T>::to_float(uint16_t(dw & 0xffff)) +
             fc::Cvt<T>::to_float(uint16_t(ow >> 16)) * fc::Cvt<T>::to_float(uint16_t(dw >> 16));
    }
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) acc += fc::shfl_xor(acc, m);
    if (lane == 0) delta[row] = acc;
  }
  fc::sync_threads();

  const int n_kblocks = (sk + BN - 1) / BN, m_blocks = (sq + BM - 1) / BM;
  for (int n = 0; n < n_kblocks; ++n) {
    const int n0 = n * BN;
    const int m_begin = f.causal ? (n0 / BM < m_blocks ? n0 / BM : m_blocks) : 0;
    float dkacc[DT][4], dvacc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dkacc[i][e] = dvacc[i][e] = 0.f;

    // this thread's two keys (rows g, g + 8 of the warp's 16) and whether they may be attended
    const int key_lo = n0 + warp * 16 + g;
    bool key_ok[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key_lo + 8 * r;
      key_ok[r] = key < sk && !(kp != nullptr && kp[key] != 0);
    }

    if (m_begin < m_blocks) {
      load_tile_async<BN, D_PAD, LD, THREADS>(sK, k + int64_t(n0) * f.k_str.s, f.k_str.s, sk - n0, d, tid, f.k);
      load_tile_async<BN, D_PAD, LD, THREADS>(sV, v + int64_t(n0) * f.v_str.s, f.v_str.s, sk - n0, d, tid, f.v);
      bwd_load_query_tile<BM, D_PAD, LD, THREADS>(m_begin, 0, sQ, sdO, sLse, sDelta, q, f.q_str.s, dout, p.dout_str.s, lse, delta, sq, d, tid, f.q, p.dout);
      fc::cp_async_commit();
    }
    for (int m = m_begin; m < m_blocks; ++m) {
      const int buf = (m - m_begin) & 1;
      if (m + 1 < m_blocks) bwd_load_query_tile<BM, D_PAD, LD, THREADS>(m + 1, buf ^ 1, sQ, sdO, sLse, sDelta, q, f.q_str.s, dout, p.dout_str.s, lse, delta, sq, d, tid, f.q, p.dout);
      fc::cp_async_commit();
      fc::cp_async_wait<1>();
      fc::sync_threads();
      const uint16_t* qs = sQ + buf * BM * LD;
      const uint16_t* dos = sdO + buf * BM * LD;
      const float* lse_s = sLse + buf * BM;
      const float* delta_s = sDelta + buf * BM;
      const int r0 = m * BM;

      // Query slices [q_begin, q_end) of the tile that can matter to the warp's 16 keys (warp-uniform): rows < sq
      // and, when causal, rows >= the warp's first key; no slice at all when its keys are all >= sk. Skipped slices
      // keep S^T = dP^T = 0 and are masked below (P = dS = 0), so their dV/dK products are skipped too.
      const int q_end = sq - r0 < BM ? sq - r0 : BM;
      int q_begin = 0;
      if (f.causal && n0 + warp * 16 - r0 > 0) q_begin = n0 + warp * 16 - r0;
      if (n0 + warp * 16 >= sk) q_begin = BM;
      auto slice_live = [&](int i) { return i * 16 < q_end && i * 16 + 16 > q_begin; };

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x BM queries
      float st[MT][4], dpt[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll 1
      for (int kk = 0; kk < (q_begin < q_end ? KT : 0); ++kk) {
        uint32_t ka[4], va[4];
        fc::ldmatrix_x4(ka, sK + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
        fc::ldmatrix_x4(va, sV + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int np = 0; np < MT / 2; ++np) {
          if (!slice_live(np)) continue;
          const int off = (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8;
          uint32_t r[4];
          fc::ldmatrix_x4(r, qs + off);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          fc::mma_16816<T>(st[2 * np], ka, b0);
          fc::mma_16816<T>(st[2 * np + 1], ka, b1);
          fc::ldmatrix_x4(r, dos + off);
          const uint32_t c0[2] = {r[0], r[1]}, c1[2] = {r[2], r[3]};
          fc::mma_16816<T>(dpt[2 * np], va, c0);
          fc::mma_16816<T>(dpt[2 * np + 1], va, c1);
        }
      }

      // P^T and dS^T (in place)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = mt * 8 + 2 * t + (e & 1);
          const int key = key_lo + 8 * (e >> 1);
          const bool ok = key_ok[e >> 1] && !(f.causal && key > r0 + qi);
          const float pv = ok ? fc::exp2_approx(st[mt][e] * scale_log2 - lse_s[qi]) : 0.f;
          st[mt][e] = pv;
          dpt[mt][e] = pv * (dpt[mt][e] - delta_s[qi]);
        }

      // dV += P^T dO, dK += dS^T Q
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        const uint32_t pa[4] = {fc::Cvt<T>::pack2(st[2 * kk][0], st[2 * kk][1]),
                                fc::Cvt<T>::pack2(st[2 * kk][2], st[2 * kk][3]),
                                fc::Cvt<T>::pack2(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                                fc::Cvt<T>::pack2(st[2 * kk + 1][2], st[2 * kk + 1][3])};
        const uint32_t sa[4] = {fc::Cvt<T>::pack2(dpt[2 * kk][0], dpt[2 * kk][1]),
                                fc::Cvt<T>::pack2(dpt[2 * kk][2], dpt[2 * kk][3]),
                                fc::Cvt<T>::pack2(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                fc::Cvt<T>::pack2(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
        // dS^T rows of this warp into shared memory for dQ (the same rounded values as the dK product uses)
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * LDS + kk * 16 + 2 * t) = sa[0];
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * LDS + kk * 16 + 2 * t) = sa[1];
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g) * LDS + kk * 16 + 8 + 2 * t) = sa[2];
        *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + g + 8) * LDS + kk * 16 + 8 + 2 * t) = sa[3];
        if (!slice_live(kk)) continue;
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
          const int off = (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + dp * 16 + (lane >> 4) * 8;
          uint32_t r[4];
          fc::ldmatrix_x4_trans(r, dos + off);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          fc::mma_16816<T>(dvacc[2 * dp], pa, b0);
          fc::mma_16816<T>(dvacc[2 * dp + 1], pa, b1);
          fc::ldmatrix_x4_trans(r, qs + off);
          const uint32_t c0[2] = {r[0], r[1]}, c1[2] = {r[2], r[3]};
          fc::mma_16816<T>(dkacc[2 * dp], sa, c0);
          fc::mma_16816<T>(dkacc[2 * dp + 1], sa, c1);
        }
      }
      fc::sync_threads();  // dS^T complete

      // dQ tile part = dS K: warp -> rows rg*16.., columns cp*DQC..
      {
        const int rg = warp % C::WM, cpart = warp / C::WM;
        float dqa[DQT][4];
#pragma unroll
        for (int i = 0; i < DQT; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          // dS = 0 for keys >= sk and, when causal, for keys past the last row of the warp's 16
          if (n0 + kk * 16 >= sk || (f.causal && n0 + kk * 16 > r0 + rg * 16 + 15)) continue;
          uint32_t a[4];
          fc::ldmatrix_x4_trans(a, sdS + (kk * 16 + (lane >> 4) * 8 + (lane & 7)) * LDS + rg * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int dp = 0; dp < DQT / 2; ++dp) {
            uint32_t r[4];
            fc::ldmatrix_x4_trans(
                r, sK + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + cpart * C::DQC + dp * 16 + (lane >> 4) * 8);
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
            fc::mma_16816<T>(dqa[2 * dp], a, b0);
            fc::mma_16816<T>(dqa[2 * dp + 1], a, b1);
          }
        }
        // key blocks visiting query block m: n = n_first .. n_last
        const bool first = n == 0;
        const int n_last = f.causal ? ((r0 + BM - 1) / BN < n_kblocks - 1 ? (r0 + BM - 1) / BN : n_kblocks - 1)
                                    : n_kblocks - 1;
        const bool last = n == n_last;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = r0 + rg * 16 + g + 8 * r;
          if (row >= sq) continue;
#pragma unroll
          for (int dt = 0; dt < DQT; ++dt) {
            const int col = cpart * C::DQC + dt * 8 + 2 * t;
            if (col >= d) continue;
            float x0 = dqa[dt][2 * r], x1 = dqa[dt][2 * r + 1];
            float* acc = dq_acc + int64_t(row) * d + col;
            if (!first) {
              x0 += acc[0];
              x1 += acc[1];
            }
            if (last) {
              *reinterpret_cast<uint32_t*>(dq + row * out_row + col) =
                  fc::Cvt<T>::pack2(x0 * f.softmax_scale, x1 * f.softmax_scale);
            } else {
              acc[0] = x0;
              acc[1] = x1;
            }
          }
        }
      }
      fc::sync_threads();  // buffers and dS^T free for the next query tile
    }
    fc::cp_async_wait<0>();

    // dK, dV of the warp's 16 keys
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key_lo + 8 * r;
      if (key >= sk) continue;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t;
        if (col >= d) continue;
        *reinterpret_cast<uint32_t*>(dk + key * out_row + col) =
            fc::Cvt<T>::pack2(dkacc[dt][2 * r] * f.softmax_scale, dkacc[dt][2 * r + 1] * f.softmax_scale);
        *reinterpret_cast<uint32_t*>(dv + key * out_row + col) = fc::Cvt<T>::pack2(dvacc[dt][2 * r], dvacc[dt][2 * r + 1]);
      }
    }
  }
}

template <class T, int D_PAD>
fc::Error flash_bwd_run(const AttnBwdParams& p, float* ws_dq, float* ws_delta, void* stream) {
  using C = BwdCfg<D_PAD>;
  const fc::Dim3 grid{unsigned(p.fwd.batch * p.fwd.heads), 1, 1};
  return fc::launch(flash_bwd_kernel<T, D_PAD>, grid, fc::Dim3{unsigned(C::THREADS), 1, 1}, C::SMEM,
                    static_cast<fc::Stream>(stream), p, ws_dq, ws_delta);
}

template <class T>
const char* flash_bwd_launch(const AttnBwdParams& p, void* workspace, void* stream) {
  if (const char* e = check_fwd_params(p.fwd)) return e;
  if (p.dout == nullptr || p.dq == nullptr || p.dk == nullptr || p.dv == nullptr || workspace == nullptr)
    return "fastclip flash attention backward: null dout, dq, dk, dv or workspace pointer";
  if (!aligned16(p.dout) || !aligned16(p.dq) || !aligned16(p.dk) || !aligned16(p.dv))
    return "fastclip flash attention backward: dout, dq, dk and dv must be 16-byte aligned";
  if (!strides_ok(p.dout_str))
    return "fastclip flash attention backward: dout strides must be multiples of 8 elements";
  if ((reinterpret_cast<uintptr_t>(workspace) & 255) != 0)
    return "fastclip flash attention backward: workspace must be 256-byte aligned";
  const size_t rows = size_t(p.fwd.batch) * size_t(p.fwd.heads) * size_t(p.fwd.sq);
  float* ws_dq = static_cast<float*>(workspace);
  float* ws_delta = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + align256(rows * size_t(p.fwd.d) * 4));
  fc::Error err;
  switch (pad_head_dim(p.fwd.d)) {
    case 32: err = flash_bwd_run<T, 32>(p, ws_dq, ws_delta, stream); break;
    case 64: err = flash_bwd_run<T, 64>(p, ws_dq, ws_delta, stream); break;
    case 96: err = flash_bwd_run<T, 96>(p, ws_dq, ws_delta, stream); break;
    default: err = flash_bwd_run<T, 128>(p, ws_dq, ws_delta, stream); break;
  }
  return fc::launch_result(err);
}

}  // namespace attn_detail
}  // namespace fastclip
