// CLIP contrastive (InfoNCE) loss on tensor cores: templated kernels and launchers (contrastive.h is the contract).
//
// Forward (contrastive_fwd_kernel, 1 GEMM = 2 n^2 d FLOPs): a block owns BM = 16 MT WARPS = 128 rows of image (warp
// w: the MT = 2 m16 tiles from row 32 w) and walks every BN = 64 column block of text, starting at column block
// blockIdx.x mod #blocks so that concurrent blocks merge into different columns. Each (column block, BK = 64 slice of
// d) step is staged in shared memory by cp.async, double buffered across the flattened loop; S tiles come from
// ldmatrix + mma.m16n8k16 (image rows = A row-major; text rows give B "col" directly, non-trans ldmatrix), with the
// diagonal replaced by the caller's t_ii. Statistics are (max, rest) (contrastive.h): a row's stay online in
// registers, each thread holding the sum of its terms below the max and the count of its terms equal to it (the
// count is exact, so rest = sum + (count - 1) keeps a confident row's ~1e-9 rest); each tile's column (max, rest) is
// reduced over the warp's rows by shuffles, over the warps through shared memory, then merged into col_packed[j] by
// a 64-bit atomicCAS loop (so the column statistics depend on the merge order at the rounding level: not bitwise
// deterministic).
//
// Backward (contrastive_bwd_kernel, 2 GEMMs = 4 n^2 d FLOPs per launch, 8 n^2 d for both gradients, no atomics,
// deterministic): a block owns BM = 16 MW rows of a, kept in shared memory for the whole kernel; the NW warps of each
// 16-row group split d evenly into slices of at most DW = D_MAX / NW (multiples of 16). For each BN-row tile of b
// (cp.async, STAGES buffers, whole d):
//   GEMM1: warp (mw, nw) computes the partial S (16 x BN) over its own d slice (split-K); with NW > 1 the partials
//          are summed through shared memory in a fixed order.
//   ds:    fp32, ds = 2^(t - lse_a) + 2^(t - lse_b) - diag [i == j] - uniform (0 outside the n x n matrix; on the
//          diagonal t = the caller's t_ii and the targets are subtracted inside two expm1s), rounded to T as GEMM2's
//          A operand (fp16: times 2^14, so that a confident row's ~1e-9 ds is not flushed to 0; undone exactly on
//          the fp32 sums). NW == 1: straight from the accumulator registers (the C fragments of two n8
//          tiles are one k16 A fragment). NW > 1 and BN / NW >= 8 (the 256- and 512-wide configs): each warp of the
//          row group forms BN / NW of the columns and they trade them through shared memory (ldmatrix). 1024- and
//          2048-wide configs (BN = 16 < 8 NW): every warp forms the row group's whole 16 x BN ds (NW-fold exp2 work:
//          16 exp2 per element against the GEMMs' 4 d = 8192 FLOPs at d = 2048).
//   GEMM2: acc (16 x slice, fp32 registers) += ds (16 x BN) @ b_tile[:, slice] (B fragments by ldmatrix .trans).
//   ds_dot: each thread also sums ds * S over the entries it forms (fp32 ds before rounding, the full fp32 S), one
//          FMA per entry; at the end the quad's sums are added by shuffles and, where the NW warps of a row group
//          formed disjoint columns (SHARE), through shared memory in warp order. No atomics: deterministic.
// grad_a is stored with 8-byte vector stores (the launcher checks grad_a's 8-byte alignment).
#pragma once

#include "../common/device.cuh"
#include "contrastive.h"

namespace fastclip {
namespace contrastive_detail {

constexpr float kLog2e = 1.4426950408889634f;

FC_DEVICE float neg_inf() { return fc::bits_to_float(0xff800000u); }
// ds is rounded to T for GEMM2 times this power of two (and the sums scaled back, exactly): a confident row's ds is
// ~1 - p_ii, 1e-6 .. 1e-12, below fp16's smallest normal (6e-5) and even subnormal (6e-8). |ds| <= 2, so 2^14 ds
// stays below fp16's largest finite value (65504). bf16 has fp32's range.
template <class T>
constexpr float kDsUp = 1.f;
template <>
constexpr float kDsUp<fc::Fp16> = 16384.f;
// Merge the (max, rest) partial (m2, r2) into (m1, r1), base 2, never forming 1 + rest of the partial that holds the
// max (an empty partial is (-inf, -1)).
FC_DEVICE void merge_rest(float& m1, float& r1, float m2, float r2) {
  const float m = fmaxf(m1, m2);
  const float m_use = m == neg_inf() ? 0.f : m;
  r1 = m1 >= m2 ? r1 + (1.f + r2) * fc::exp2_approx(m2 - m_use) : r2 + (1.f + r1) * fc::exp2_approx(m1 - m_use);
  m1 = m;
}
FC_DEVICE int imin(int a, int b) { return a < b ? a : b; }
struct alignas(8) Float2 {  // one 8-byte store (st.global.v2.f32)
  float x, y;
};

// ------------------------------------------------------------------------------------------------------------------
// Forward

template <int WARPS, int MT, int BN, int BK>
struct FwdCfg {
  static constexpr int BM = 16 * MT * WARPS;           // MT m16 tiles per warp: each B fragment feeds MT mmas
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int PITCH = BK + 8;                  // halves per smem row: +16 bytes, conflict-free ldmatrix
  static constexpr int STAGE = (BM + BN) * PITCH;       // halves per pipeline stage (image rows, then text rows)
  static constexpr int SMEM = 2 * STAGE * 2 + WARPS * BN * 2 * 4;  // 2 stages + per-warp column (max, rest)
  static_assert(BN % 16 == 0 && BK % 16 == 0 && BN <= THREADS, "tile shape");
};

template <class T, int WARPS, int MT, int BN, int BK>
FC_GLOBAL void FC_LAUNCH_BOUNDS(32 * WARPS) contrastive_fwd_kernel(ContrastiveFwdParams p) {
  using C = FwdCfg<WARPS, MT, BN, BK>;
  constexpr int BM = C::BM, PITCH = C::PITCH, STAGE = C::STAGE, NT = BN / 8;
  FC_DYNAMIC_SMEM(smem);
  uint16_t* sbuf = reinterpret_cast<uint16_t*>(smem);
  float* scol = reinterpret_cast<float*>(smem + 2 * STAGE * 2);  // [WARPS][BN][2]: (max, rest)

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
  const int n = p.n, d = p.d;
  const int row0 = int(blockIdx.x) * BM;
  const int ncb = (n + BN - 1) / BN;
  const int d16 = (d + 15) & ~15;
  const int nk = (d16 + BK - 1) / BK;
  const int total = ncb * nk;
  const int cb0 = int(blockIdx.x) % ncb;
  const float scale2 = *p.scale * kLog2e;
  const float NEG_INF = neg_inf();
  // this thread's rows: wrow + 16 mt + g (c = 0, 1) and + 8 (c = 2, 3)
  const int wrow = row0 + warp * 16 * MT;

  auto load = [&](int it, int stage) {
    const int cb = (cb0 + it / nk) % ncb, k0 = (it % nk) * BK;
    constexpr int CPR = BK / 8;  // 16-byte chunks per row
    uint16_t* s = sbuf + stage * STAGE;
    for (int c = tid; c < (BM + BN) * CPR; c += C::THREADS) {
      const int r = c / CPR, kc = k0 + (c % CPR) * 8;
      if (kc >= d16) continue;  // never read
      const bool is_a = r < BM;
      const int grow = is_a ? row0 + r : cb * BN + (r - BM);
      const uint16_t* base = is_a ? p.image : p.text;
      const int64_t stride = is_a ? p.image_stride : p.text_stride;
      const bool pred = grow < n && kc < d;
      fc::cp_async_16(s + r * PITCH + (c % CPR) * 8, pred ? base + int64_t(grow) * stride + kc : base, pred);
    }
  };

  // row statistics: the max (quad-uniform), and this thread's sum of 2^(t - max) over its terms below the max and
  // count of terms equal to it
  float m_r[MT][2], e_r[MT][2], c_r[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_r[mt][r] = NEG_INF;
      e_r[mt][r] = 0.f;
      c_r[mt][r] = 0.f;
    }
  float acc[MT][NT][4];

  load(0, 0);
  fc::cp_async_commit();
  for (int it = 0; it < total; ++it) {
    const int kk = it % nk;
    if (kk == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.f;
    }
    fc::cp_async_wait<0>();
    fc::sync_threads();  // stage it&1 is complete for everyone; everyone is done reading stage (it+1)&1
    if (it + 1 < total) load(it + 1, (it + 1) & 1);
    fc::cp_async_commit();

    const uint16_t* sa = sbuf + (it & 1) * STAGE;
    const uint16_t* sb = sa + BM * PITCH;
    const int ksteps = imin(BK, d16 - kk * BK) / 16;
    for (int ks = 0; ks < ksteps; ++ks) {
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        fc::ldmatrix_x4(af[mt], sa + ((warp * MT + mt) * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + ks * 16 +
                                    (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t bf[4];
        fc::ldmatrix_x4(bf, sb + (np * 16 + (lane & 7) + (lane >> 4) * 8) * PITCH + ks * 16 + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          fc::mma_16816<T>(acc[mt][2 * np], af[mt], b0);
          fc::mma_16816<T>(acc[mt][2 * np + 1], af[mt], b1);
        }
      }
    }
    if (kk != nk - 1) continue;

    // ---- epilogue of column block cb: base-2 logits, masked (t = -inf outside the n x n matrix), t_ii = diag[i]
    const int cb = (cb0 + it / nk) % ncb, col0 = cb * BN;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int row = wrow + mt * 16 + g + (c >= 2 ? 8 : 0), col = col0 + nt * 8 + 2 * tq + (c & 1);
          const float t = row == col ? p.diag[imin(row, n - 1)] : acc[mt][nt][c] * scale2;
          acc[mt][nt][c] = (row < n && col < n) ? t : NEG_INF;
        }
    // row statistics (online; the max is quad-uniform, the sum and count stay per-thread partials)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc[mt][nt][2 * r], acc[mt][nt][2 * r + 1]));
        mx = fc::warp_reduce_max4(mx);
        const float m_new = fmaxf(m_r[mt][r], mx);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;  // rows past n see only -inf
        if (m_new > m_r[mt][r]) {  // a new max: the old maxima become ordinary terms (quad-uniform branch)
          e_r[mt][r] = (e_r[mt][r] + c_r[mt][r]) * fc::exp2_approx(m_r[mt][r] - m_use);
          c_r[mt][r] = 0.f;
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = acc[mt][nt][2 * r + e];
            if (x == m_new) c_r[mt][r] += 1.f;
            else e_r[mt][r] += fc::exp2_approx(x - m_use);
          }
        m_r[mt][r] = m_new;
      }
    // column statistics over this warp's 16 MT rows: the 2 MT values of a column in this thread, then the 8 lanes
    // with the same tq (xor 4, 8, 16)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float cm = NEG_INF;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) cm = fmaxf(cm, fmaxf(acc[mt][nt][e], acc[mt][nt][e + 2]));
        cm = fmaxf(cm, fc::shfl_xor(cm, 4));
        cm = fmaxf(cm, fc::shfl_xor(cm, 8));
        cm = fmaxf(cm, fc::shfl_xor(cm, 16));
        const float cm_use = cm == NEG_INF ? 0.f : cm;
        float cs = 0.f, cc = 0.f;  // terms below the max, terms equal to it
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 4; h += 2) {
            const float x = acc[mt][nt][e + h];
            if (x == cm) cc += 1.f;
            else cs += fc::exp2_approx(x - cm_use);
          }
#pragma unroll
        for (int mask = 4; mask <= 16; mask *= 2) {
          cs += fc::shfl_xor(cs, mask);
          cc += fc::shfl_xor(cc, mask);
        }
        if (g == 0) {
          const int cl = nt * 8 + 2 * tq + e;
          scol[(warp * BN + cl) * 2] = cm;
          scol[(warp * BN + cl) * 2 + 1] = cm == NEG_INF ? -1.f : cs + (cc - 1.f);  // a warp of rows past n: empty
        }
      }
    fc::sync_threads();
    // (the next write of scol follows the next iteration's sync_threads)
    if (tid < BN && col0 + tid < n) {
      float M = NEG_INF, R = -1.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) merge_rest(M, R, scol[(w * BN + tid) * 2], scol[(w * BN + tid) * 2 + 1]);
      // merge (M, R) into the column's packed (max, rest): 64-bit CAS loop (the first guess may be stale)
      unsigned long long* addr = p.col_packed + (col0 + tid);
      unsigned long long old = *reinterpret_cast<volatile unsigned long long*>(addr);
      while (true) {
        float nm = fc::bits_to_float(uint32_t(old)), ns = fc::bits_to_float(uint32_t(old >> 32));
        merge_rest(nm, ns, M, R);
        const unsigned long long nv =
            (unsigned long long)fc::float_to_bits(nm) | ((unsigned long long)fc::float_to_bits(ns) << 32);
        const unsigned long long prev = fc::atomic_cas(addr, old, nv);
        if (prev == old) break;
        old = prev;
      }
    }
  }
  fc::cp_async_wait<0>();  // the last (empty) group

#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float e = fc::warp_reduce_sum4(e_r[mt][r]), c = fc::warp_reduce_sum4(c_r[mt][r]);
      const int row = wrow + mt * 16 + g + 8 * r;
      if (tq == 0 && row < n) {
        p.row_max[row] = m_r[mt][r];
        p.row_rest[row] = e + (c - 1.f);
      }
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Backward

template <int D_MAX, int MW, int NW, int BN, int STAGES>
struct BwdCfg {
  static constexpr int BM = 16 * MW;
  static constexpr int WARPS = MW * NW;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int PITCH = D_MAX + 8;  // halves per smem row
  static constexpr int DW = D_MAX / NW;    // each warp's d slice
  static constexpr int SA = BM * PITCH;    // halves
  static constexpr int SB = BN * PITCH;    // halves per stage
  static constexpr int PART = NW > 1 ? WARPS * (BN / 8) * 4 * 32 : 0;  // floats: partial S in fragment order
  // SHARE: each of the NW warps of a row group forms ds for BN / NW of the columns and they exchange it (as T)
  // through shared memory; otherwise (NW == 1, or BN / NW < 8) every warp forms the row group's whole 16 x BN ds
  static constexpr bool SHARE = NW > 1 && BN / NW >= 8 && (BN / 8) % NW == 0;
  static constexpr int DSP = BN + 8;  // halves per row of the shared ds tile
  static constexpr int SDS = SHARE ? BM * DSP : 0;
  static constexpr int SMEM = (SA + STAGES * SB) * 2 + PART * 4 + SDS * 2;
  static_assert(BN % 16 == 0 && DW % 16 == 0 && (STAGES == 1 || STAGES == 2), "tile shape");
};

template <class T, int D_MAX, int MW, int NW, int BN, int STAGES>
FC_GLOBAL void FC_LAUNCH_BOUNDS(32 * MW * NW) contrastive_bwd_kernel(ContrastiveBwdParams p) {
  using C = BwdCfg<D_MAX, MW, NW, BN, STAGES>;
  constexpr int BM = C::BM, PITCH = C::PITCH, DW = C::DW, NT = BN / 8, NO = DW / 8;
  FC_DYNAMIC_SMEM(smem);
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sbuf = sa + C::SA;
  float* spart = reinterpret_cast<float*>(smem + (C::SA + STAGES * C::SB) * 2);
  uint16_t* sds = reinterpret_cast<uint16_t*>(spart + C::PART);

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
  const int mw = warp / NW, nw = warp % NW;
  const int n = p.n, d = p.d;
  const int row0 = int(blockIdx.x) * BM;
  const int ncb = (n + BN - 1) / BN;
  const int d16 = (d + 15) & ~15;
  const int cpr = d16 / 8;  // 16-byte chunks per row actually used
  const float scale2 = *p.scale * kLog2e;
  const float diag = p.diag_coef, uniform = p.uniform_coef;
  // this warp's d slice (k of GEMM1, n of GEMM2): d16 split evenly in multiples of 16 (at most DW), so that no warp
  // idles when d is well below D_MAX (d = 768 in the 1024-wide config: 4 slices of 192)
  const int w16 = ((d16 / 16 + NW - 1) / NW) * 16;
  const int k_lo = imin(nw * w16, d16), k_hi = imin(k_lo + w16, d16);

  // rows of a: resident for the whole kernel
  for (int c = tid; c < BM * cpr; c += C::THREADS) {
    const int r = c / cpr, kc = (c % cpr) * 8, grow = row0 + r;
    const bool pred = grow < n && kc < d;
    fc::cp_async_16(sa + r * PITCH + kc, pred ? p.a + int64_t(grow) * p.a_stride + kc : p.a, pred);
  }
  auto load_b = [&](int cb, int stage) {
    uint16_t* s = sbuf + stage * C::SB;
    for (int c = tid; c < BN * cpr; c += C::THREADS) {
      const int r = c / cpr, kc = (c % cpr) * 8, grow = cb * BN + r;
      const bool pred = grow < n && kc < d;
      fc::cp_async_16(s + r * PITCH + kc, pred ? p.b + int64_t(grow) * p.b_stride + kc : p.b, pred);
    }
  };
  load_b(0, 0);
  fc::cp_async_commit();

  // this thread's rows: ra (c = 0, 1) and ra + 8 (c = 2, 3)
  const int ra = row0 + mw * 16 + g;
  float ma[2], la[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = ra + 8 * r;
    ma[r] = row < n ? p.a_stats[row] : 0.f;
    la[r] = row < n ? p.a_stats[n + row] : 0.f;
  }

  float acc[NO][4];
#pragma unroll
  for (int o = 0; o < NO; ++o)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[o][c] = 0.f;
  float dot[2] = {0.f, 0.f};  // ds_dot of rows ra, ra + 8 over the entries this thread forms

  for (int cb = 0; cb < ncb; ++cb) {
    const int stage = STAGES == 2 ? (cb & 1) : 0;
    fc::cp_async_wait<0>();
    fc::sync_threads();  // b tile cb (and a) in smem; every warp is done with the other stage
    if (STAGES == 2 && cb + 1 < ncb) {
      load_b(cb + 1, (cb + 1) & 1);
      fc::cp_async_commit();
    }
    const uint16_t* sb = sbuf + stage * C::SB;

    // ---- GEMM1 (split-K over the warp's d slice): s = a[rows] . b[cols] over k in [k_lo, k_hi)
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = 0.f;
    for (int k = k_lo; k < k_hi; k += 16) {
      uint32_t af[4];
      fc::ldmatrix_x4(af, sa + (mw * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + k + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t bf[4];
        fc::ldmatrix_x4(bf, sb + (np * 16 + (lane & 7) + (lane >> 4) * 8) * PITCH + k + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        fc::mma_16816<T>(s[2 * np], af, b0);
        fc::mma_16816<T>(s[2 * np + 1], af, b1);
      }
    }
    // ---- ds = 2^(t - lse_a) + 2^(t - lse_b) - diag [i == j] - uniform in fp32, 0 outside the n x n matrix; on the
    // diagonal t = the caller's t_ii and each p - 1 is one expm1 (~1 - p_ii: 2^x - 1 would round it away); ds S
    // joins the row's ds_dot in fp32, and ds is returned as GEMM2 rounds it (times kDsUp: exact)
    const int col0 = cb * BN;
    auto ds_of = [&](float sv, int r, int row, int col, bool cvalid, float mb, float lb) {
      if (!cvalid || row >= n) return 0.f;
      float ds;
      if (row == col) {
        const float t = p.diag[row];
        ds = fc::expm1_2((t - ma[r]) - la[r]) + fc::expm1_2((t - mb) - lb) + (2.f - diag) - uniform;
      } else {
        const float t = sv * scale2;
        ds = fc::exp2_approx((t - ma[r]) - la[r]) + fc::exp2_approx((t - mb) - lb) - uniform;
      }
      dot[r] += ds * sv;
      return ds * kDsUp<T>;
    };
    if (NW > 1) {  // publish this warp's partial S (its d slice) for the row group
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) spart[((warp * NT + nt) * 4 + c) * 32 + lane] = s[nt][c];
      fc::sync_threads();
      // (spart is next written after the next iteration's sync_threads)
    }
    if constexpr (C::SHARE) {
      // this warp forms the n8 tiles [nw CT, (nw + 1) CT) of the row group's ds, summing the NW partials in a fixed
      // order, and stores them rounded to T in sds (rows mw * 16 .., BN + 8 halves apart)
      constexpr int CT = NT / NW;
#pragma unroll
      for (int ct = 0; ct < CT; ++ct) {
        const int nt = nw * CT + ct;
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          v[c] = 0.f;
#pragma unroll
          for (int w = 0; w < NW; ++w) v[c] += spart[(((mw * NW + w) * NT + nt) * 4 + c) * 32 + lane];
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + nt * 8 + 2 * tq + e;
          const bool cvalid = col < n;
          const float mb = cvalid ? p.b_stats[col] : 0.f, lb = cvalid ? p.b_stats[n + col] : 0.f;
#pragma unroll
          for (int r = 0; r < 2; ++r) v[2 * r + e] = ds_of(v[2 * r + e], r, ra + 8 * r, col, cvalid, mb, lb);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(sds + (mw * 16 + g + 8 * r) * C::DSP + nt * 8 + 2 * tq) =
              fc::Cvt<T>::pack2(v[2 * r], v[2 * r + 1]);
      }
      fc::sync_threads();  // (sds is next written after the next iteration's two sync_threads)
    } else {
      if (NW > 1) {  // every warp of the row group sums the NW partials, in a fixed order
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < NW; ++w) v += spart[(((mw * NW + w) * NT + nt) * 4 + c) * 32 + lane];
            s[nt][c] = v;
          }
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + nt * 8 + 2 * tq + e;
          const bool cvalid = col < n;
          const float mb = cvalid ? p.b_stats[col] : 0.f, lb = cvalid ? p.b_stats[n + col] : 0.f;
#pragma unroll
          for (int r = 0; r < 2; ++r) s[nt][2 * r + e] = ds_of(s[nt][2 * r + e], r, ra + 8 * r, col, cvalid, mb, lb);
        }
    }

    // ---- GEMM2: acc (16 x slice) += ds (16 x BN, rounded to T) @ b_tile[:, k_lo : k_hi]
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t af[4];
      if constexpr (C::SHARE) {
        fc::ldmatrix_x4(af, sds + (mw * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * C::DSP + kk * 16 + (lane >> 4) * 8);
      } else {  // the C fragments of n8 tiles 2kk and 2kk+1 are the A fragment of k16 step kk
        af[0] = fc::Cvt<T>::pack2(s[2 * kk][0], s[2 * kk][1]);
        af[1] = fc::Cvt<T>::pack2(s[2 * kk][2], s[2 * kk][3]);
        af[2] = fc::Cvt<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        af[3] = fc::Cvt<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        if (k_lo + np * 16 >= k_hi) break;  // warp-uniform: the rest of the slice is past d or another warp's
        uint32_t bf[4];
        fc::ldmatrix_x4_trans(bf, sb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * PITCH + k_lo + np * 16 +
                                      (lane >> 4) * 8);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        fc::mma_16816<T>(acc[2 * np], af, b0);
        fc::mma_16816<T>(acc[2 * np + 1], af, b1);
      }
    }

    if (STAGES == 1 && cb + 1 < ncb) {
      fc::sync_threads();  // every warp is done with the only stage
      load_b(cb + 1, 0);
      fc::cp_async_commit();
    }
  }
  fc::cp_async_wait<0>();

  // ---- grad_a (fp32, contiguous (n, d)): rows < n, columns < d
#pragma unroll
  for (int o = 0; o < NO; ++o)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = ra + 8 * r, col = k_lo + o * 8 + 2 * tq;
      if (row < n && col < k_hi && col < d) {
        constexpr float down = 1.f / kDsUp<T>;
        *reinterpret_cast<Float2*>(p.grad_a + int64_t(row) * d + col) =
            Float2{acc[o][2 * r] * down, acc[o][2 * r + 1] * down};
      }
    }

  // ---- ds_dot: the quad's 4 lanes, then (SHARE: the NW warps of a row group formed disjoint columns) the row
  // group's warps in order through spart, free since the last iteration's sds barrier. Otherwise each warp of the
  // row group holds the whole sum and warp nw = 0 stores it.
  if (p.ds_dot == nullptr) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) dot[r] = fc::warp_reduce_sum4(dot[r]);
  if constexpr (C::SHARE) {
    if (tq == 0) {
      spart[warp * 16 + g] = dot[0];
      spart[warp * 16 + g + 8] = dot[1];
    }
    fc::sync_threads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      dot[r] = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) dot[r] += spart[(mw * NW + w) * 16 + g + 8 * r];
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)
    if (nw == 0 && tq == 0 && ra + 8 * r < n) p.ds_dot[ra + 8 * r] = dot[r];
}

// ------------------------------------------------------------------------------------------------------------------
// Launchers

inline const char* check_features(const uint16_t* a, const uint16_t* b, int64_t sa, int64_t sb, int n, int d) {
  if (n < 1) return "fastclip contrastive: n must be >= 1";
  if (d < 8 || d > 2048 || d % 8 != 0) return "fastclip contrastive: d must be a multiple of 8 in [8, 2048]";
  if (a == nullptr || b == nullptr) return "fastclip contrastive: null feature pointer";
  if (!aligned16(a) || !aligned16(b)) return "fastclip contrastive: feature pointers must be 16-byte aligned";
  if (sa % 8 != 0 || sb % 8 != 0 || sa < d || sb < d)
    return "fastclip contrastive: row strides must be multiples of 8 elements and >= d";
  return nullptr;
}

// forward tiles: 128 x 64 logits per step, 4 warps (32 rows each), d in slices of 64
constexpr int kFwdWarps = 4, kFwdMT = 2, kFwdBN = 64, kFwdBK = 64;

template <class T>
const char* fwd_launch(const ContrastiveFwdParams& p, void* stream) {
  if (const char* e = check_features(p.image, p.text, p.image_stride, p.text_stride, p.n, p.d)) return e;
  if (p.scale == nullptr || p.diag == nullptr || p.row_max == nullptr || p.row_rest == nullptr ||
      p.col_packed == nullptr)
    return "fastclip contrastive_fwd: null scale, diag or output pointer";
  if ((reinterpret_cast<uintptr_t>(p.col_packed) & 7) != 0)
    return "fastclip contrastive_fwd: col_packed must be 8-byte aligned";
  using C = FwdCfg<kFwdWarps, kFwdMT, kFwdBN, kFwdBK>;
  const unsigned grid = unsigned((p.n + C::BM - 1) / C::BM);
  fc::Error err = fc::launch(contrastive_fwd_kernel<T, kFwdWarps, kFwdMT, kFwdBN, kFwdBK>, fc::Dim3{grid, 1, 1},
                             fc::Dim3{unsigned(C::THREADS), 1, 1}, C::SMEM, static_cast<fc::Stream>(stream), p);
  return fc::launch_result(err);
}

template <class T, int D_MAX, int MW, int NW, int BN, int STAGES>
const char* bwd_run(const ContrastiveBwdParams& p, void* stream) {
  using C = BwdCfg<D_MAX, MW, NW, BN, STAGES>;
  const unsigned grid = unsigned((p.n + C::BM - 1) / C::BM);
  fc::Error err = fc::launch(contrastive_bwd_kernel<T, D_MAX, MW, NW, BN, STAGES>, fc::Dim3{grid, 1, 1},
                             fc::Dim3{unsigned(C::THREADS), 1, 1}, C::SMEM, static_cast<fc::Stream>(stream), p);
  return fc::launch_result(err);
}

// Backward configs (D_MAX, MW, NW, BN, STAGES): fp32 output accumulator 16 * D_MAX / (32 * NW) per thread (64 or 128),
// shared memory <= 140 KB (sm_80 allows 163 KB).
template <class T>
const char* bwd_launch(const ContrastiveBwdParams& p, void* stream) {
  if (const char* e = check_features(p.a, p.b, p.a_stride, p.b_stride, p.n, p.d)) return e;
  if (p.scale == nullptr || p.diag == nullptr || p.a_stats == nullptr || p.b_stats == nullptr || p.grad_a == nullptr)
    return "fastclip contrastive_bwd: null scale, diag, stats or output pointer";
  if ((reinterpret_cast<uintptr_t>(p.grad_a) & 7) != 0)
    return "fastclip contrastive_bwd: grad_a must be 8-byte aligned";
  if (p.d <= 128) return bwd_run<T, 128, 4, 1, 64, 2>(p, stream);
  if (p.d <= 256) return bwd_run<T, 256, 4, 2, 32, 2>(p, stream);
  if (p.d <= 512) return bwd_run<T, 512, 2, 4, 32, 2>(p, stream);
  if (p.d <= 1024) return bwd_run<T, 1024, 2, 4, 16, 2>(p, stream);
  return bwd_run<T, 2048, 1, 8, 16, 1>(p, stream);
}

}  // namespace contrastive_detail
}  // namespace fastclip
