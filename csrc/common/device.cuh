// The device primitives every fastclip CUDA kernel is written against.
//
// Kernels include this header, never cuda_runtime.h or torch headers, and use only what is declared here plus
// plain C++ (loops, arithmetic, raw pointers): threadIdx/blockIdx/blockDim/gridDim, fc::sync_threads, warp shuffles,
// ldmatrix, mma.sync m16n8k16, cp.async, atomics and a few conversions.
//
// Two implementations share one interface:
//   * nvcc (the default): inline PTX for sm_80 and later;
//   * FASTCLIP_EMULATE (g++ on any machine): csrc/common/emulate.h runs each thread block as real OS threads with
//     barriers, and implements ldmatrix/mma/cp.async lane by lane from the PTX ISA's fragment layouts. That is how
//     the kernels are tested in CI without a GPU (tests/test_cuda_emulated.py). It checks indexing, fragment layouts,
//     masking, barriers and cp.async waits; it cannot check speed, races the barriers hide, or the PTX strings below.
//
// Element storage is uint16_t for both 16-bit types; the type is a tag (fc::Fp16, fc::Bf16) that selects the
// conversions and the mma instruction.
#pragma once

#include <stdint.h>

namespace fc {
struct Fp16 {};
struct Bf16 {};
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
}  // namespace fc

#ifdef FASTCLIP_EMULATE
#include "emulate.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define FC_GLOBAL __global__
#define FC_DEVICE __device__ __forceinline__
#define FC_LAUNCH_BOUNDS(n) __launch_bounds__(n)
// with a minimum of resident blocks per SM: (n, 1) also stops ptxas from spilling to reach a higher occupancy
#define FC_LAUNCH_BOUNDS_MIN(n, m) __launch_bounds__(n, m)
// Dynamic shared memory, 128-byte aligned: FC_DYNAMIC_SMEM(smem) declares `unsigned char* smem`.
#define FC_DYNAMIC_SMEM(name)                                      \
  extern __shared__ __align__(128) unsigned char fc_dyn_smem_[];  \
  unsigned char* name = fc_dyn_smem_

namespace fc {

using Stream = cudaStream_t;
using Error = cudaError_t;
inline const char* error_string(Error e) { return cudaGetErrorString(e); }
constexpr Error kSuccess = cudaSuccess;

FC_DEVICE void sync_threads() { __syncthreads(); }
FC_DEVICE int lane_id() { return threadIdx.x & 31; }
FC_DEVICE int warp_id() { return threadIdx.x >> 5; }

FC_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

FC_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// ldmatrix: lane l supplies the address of row (l % 8) of matrix (l / 8) (16 contiguous bytes in shared memory);
// register i receives matrix i's elements (row lane/4, cols 2*(lane%4) + {0,1}), or with _trans the transposed
// pair (rows 2*(lane%4) + {0,1}, col lane/4). x2 reads addresses from lanes 0-15, x1 from lanes 0-7.
FC_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}
FC_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}
FC_DEVICE void ldmatrix_x2(uint32_t (&r)[2], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_ptr)));
}
FC_DEVICE void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row_ptr)));
}

// d += a * b with a (16x16, row), b (16x8, col), d (16x8) fp32. With g = lane / 4, t = lane % 4:
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1]
// (the low 16 bits of a register hold the lower column/row index).
template <class T>
FC_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
FC_DEVICE void mma_16816<Fp16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
FC_DEVICE void mma_16816<Bf16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 16-byte asynchronous global -> shared copy; when !pred the 16 bytes are zero-filled and gmem is not read.
FC_DEVICE void cp_async_16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(pred ? 16 : 0));
}
FC_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// wait until at most N committed groups of this thread are still pending
template <int N>
FC_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

FC_DEVICE float exp2_approx(float x) {  // 2^x, ex2.approx (2 ulp); exp2_approx(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
FC_DEVICE float log2_approx(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

FC_DEVICE float atomic_add(float* p, float v) { return atomicAdd(p, v); }
FC_DEVICE unsigned long long atomic_cas(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  return atomicCAS(p, cmp, v);
}
FC_DEVICE float bits_to_float(uint32_t b) { return __uint_as_float(b); }
FC_DEVICE uint32_t float_to_bits(float f) { return __float_as_uint(f); }

// 16-bit conversions (round to nearest even)
template <class T>
struct Cvt;
template <>
struct Cvt<Fp16> {
  static FC_DEVICE uint16_t to_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
  static FC_DEVICE float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static FC_DEVICE uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <>
struct Cvt<Bf16> {
  static FC_DEVICE uint16_t to_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
  static FC_DEVICE float to_float(uint16_t b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static FC_DEVICE uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Launch `kernel<<<grid, block, smem, stream>>>(args...)`, raising the dynamic shared memory limit when needed.
template <class... KArgs, class... Args>
inline Error launch(void (*kernel)(KArgs...), Dim3 grid, Dim3 block, int smem_bytes, Stream stream,
                    Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    Error e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), smem_bytes, stream>>>(
      static_cast<KArgs>(args)...);
  return cudaGetLastError();
}

}  // namespace fc
#endif  // FASTCLIP_EMULATE

namespace fc {
// Shared by both implementations.
// A launcher's return value (api.h): nullptr on success, else the error's message.
inline const char* launch_result(Error e) { return e == kSuccess ? nullptr : error_string(e); }

FC_DEVICE float warp_reduce_max4(float v) {  // max over the 4 lanes of a quad (lanes 4g .. 4g+3)
  v = fmaxf(v, shfl_xor(v, 1));
  return fmaxf(v, shfl_xor(v, 2));
}
FC_DEVICE float warp_reduce_sum4(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}
// 2^x - 1 to 1-2 ulp also where 2^x rounds to 1 (the math library's expm1f, not an approximation)
FC_DEVICE float expm1_2(float x) { return expm1f(x * 0.6931471805599453f); }
}  // namespace fc
