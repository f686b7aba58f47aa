// Self-test of the device primitives: one warp multiplies a 16x16 by a 16x8 matrix through ldmatrix (x4 and x2,
// plain and .trans) and mma.sync, then checks shuffles and cp.async. The same program runs in the emulator (CI) and on a GPU
// (benchmarks/gpu_check.sh), so a GPU run confirms that the emulator's fragment layouts are the hardware's.
#include "../common/device.cuh"

template <class T>
FC_GLOBAL void selftest_kernel(const uint16_t* a, const uint16_t* b, float* c_nt, float* c_nn, float* c_tn,
                                float* shfl) {
  FC_DYNAMIC_SMEM(smem);
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem);  // A: 16x16 row-major
  uint16_t* sb = sa + 256;                            // B: 16x8 row-major (k x n)
  uint16_t* sbt = sb + 128;                           // B^T: 8x16 row-major (n x k)
  uint16_t* sat = sbt + 128;                          // A^T: 16x16 row-major (k x m)
  int l = fc::lane_id();
  // 256 + 128 halves of A and B: 48 chunks of 16 bytes; lanes take chunks l and l + 32
  for (int c = l; c < 48; c += 32) {
    const uint16_t* src = c < 32 ? a + 8 * c : b + 8 * (c - 32);
    fc::cp_async_16(sa + 8 * c, src, true);
  }
  fc::cp_async_commit();
  fc::cp_async_wait<0>();
  fc::sync_threads();
  for (int i = l; i < 128; i += 32) sbt[(i % 8) * 16 + i / 8] = sb[i];
  for (int i = l; i < 256; i += 32) sat[(i % 16) * 16 + i / 16] = sa[i];
  fc::sync_threads();
  uint32_t af[4], aft[4], bf[2], bft[2];
  fc::ldmatrix_x4(af, sa + ((l / 8) % 2 * 8 + l % 8) * 16 + (l / 16) * 8);
  // A's fragments from A^T: matrix l / 8 is A's rows (l / 8) % 2 * 8.., cols (l / 16) * 8.., i.e. A^T's rows
  // (l / 16) * 8 + l % 8 from column (l / 8) % 2 * 8, transposed
  fc::ldmatrix_x4_trans(aft, sat + ((l / 16) * 8 + l % 8) * 16 + (l / 8) % 2 * 8);
  fc::ldmatrix_x2(bf, sbt + (l % 8) * 16 + ((l / 8) % 2) * 8);  // B^T rows: b fragments directly
  fc::ldmatrix_x2_trans(bft, sb + (l % 16) * 8);                 // B rows, transposed
  float d0[4] = {0, 0, 0, 0}, d1[4] = {0, 0, 0, 0}, d2[4] = {0, 0, 0, 0};
  fc::mma_16816<T>(d0, af, bf);
  fc::mma_16816<T>(d1, af, bft);
  fc::mma_16816<T>(d2, aft, bf);
  int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    c_nt[row * 8 + col] = d0[i];
    c_nn[row * 8 + col] = d1[i];
    c_tn[row * 8 + col] = d2[i];
  }
  shfl[l] = fc::shfl_xor(float(l), 5) + 100.f * fc::warp_reduce_sum4(float(l));
}

#include <cstdio>
#include <cstdlib>

#ifdef FASTCLIP_EMULATE
static uint16_t host_f16(float x) { return fc::Cvt<fc::Fp16>::to_bits(x); }
static float host_f16_to_float(uint16_t b) { return fc::Cvt<fc::Fp16>::to_float(b); }
#else
static uint16_t host_f16(float x) { return __half_as_ushort(__float2half_rn(x)); }
static float host_f16_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
#endif

// Emulator: g++ -std=c++20 -pthread -DFASTCLIP_EMULATE -x c++ primitives_selftest.cu (tests/test_cuda_emulator.py).
// GPU: nvcc -std=c++17 -arch=sm_90 primitives_selftest.cu (benchmarks/gpu_check.sh): the same kernel and checks on
// hardware, which confirms the fragment layouts the emulator implements.
int main() {
  uint16_t a[256], b[128];
  float ref[128] = {0}, c_nt[128], c_nn[128], c_tn[128], shfl[32];
  for (int i = 0; i < 256; ++i) a[i] = host_f16(float((i * 7) % 13) - 6.f);
  for (int i = 0; i < 128; ++i) b[i] = host_f16(float((i * 5) % 11) - 5.f);
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) ref[r * 8 + n] += host_f16_to_float(a[r * 16 + k]) * host_f16_to_float(b[k * 8 + n]);
  alignas(16) static uint16_t ab[256 + 128];
  for (int i = 0; i < 256; ++i) ab[i] = a[i];
  for (int i = 0; i < 128; ++i) ab[256 + i] = b[i];
#ifdef FASTCLIP_EMULATE
  fc::launch(selftest_kernel<fc::Fp16>, {1, 1, 1}, {32, 1, 1}, 2048, nullptr, ab, ab + 256, c_nt, c_nn, c_tn, shfl);
#else
  uint16_t* d_ab;
  float* d_out;
  if (cudaMalloc(&d_ab, sizeof(ab)) != cudaSuccess || cudaMalloc(&d_out, (3 * 128 + 32) * sizeof(float)) != cudaSuccess) {
    std::printf("FAIL: cudaMalloc\n");
    return 2;
  }
  cudaMemcpy(d_ab, ab, sizeof(ab), cudaMemcpyHostToDevice);
  fc::Error e = fc::launch(selftest_kernel<fc::Fp16>, {1, 1, 1}, {32, 1, 1}, 2048, nullptr, d_ab, d_ab + 256, d_out,
                           d_out + 128, d_out + 256, d_out + 384);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    std::printf("FAIL: %s\n", cudaGetErrorString(e));
    return 2;
  }
  cudaMemcpy(c_nt, d_out, sizeof(c_nt), cudaMemcpyDeviceToHost);
  cudaMemcpy(c_nn, d_out + 128, sizeof(c_nn), cudaMemcpyDeviceToHost);
  cudaMemcpy(c_tn, d_out + 256, sizeof(c_tn), cudaMemcpyDeviceToHost);
  cudaMemcpy(shfl, d_out + 384, sizeof(shfl), cudaMemcpyDeviceToHost);
#endif
  int bad = 0;
  for (int i = 0; i < 128; ++i) bad += (c_nt[i] != ref[i]) + (c_nn[i] != ref[i]) + (c_tn[i] != ref[i]);
  for (int l = 0; l < 32; ++l) {
    int q = l & ~3;
    bad += shfl[l] != float(l ^ 5) + 100.f * float(4 * q + 6);
  }
#ifdef FASTCLIP_EMULATE
  // the emulator's conversions: round to nearest even at the half-way points
  bad += fc::Cvt<fc::Fp16>::to_bits(1.0f + 1.0f / 2048) != 0x3c00;          // tie -> even
  bad += fc::Cvt<fc::Fp16>::to_bits(1.0f + 3.0f / 2048) != 0x3c02;          // tie -> even (up)
  bad += fc::Cvt<fc::Bf16>::to_bits(1.0f + 1.0f / 256) != 0x3f80;
  bad += fc::Cvt<fc::Bf16>::to_bits(1.0f + 3.0f / 256) != 0x3f82;
  bad += fc::Cvt<fc::Fp16>::to_float(fc::Cvt<fc::Fp16>::to_bits(65504.f)) != 65504.f;
  bad += fc::Cvt<fc::Fp16>::to_bits(1e-7f) != 0x0002;                       // subnormal 1e-7 / 2^-24 = 1.68 -> 2
#endif
  std::printf(bad ? "FAIL %d\n" : "OK\n", bad);
  return bad ? 1 : 0;
}
