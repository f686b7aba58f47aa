// extern "C" shims over the flash attention launchers for the CPU emulator tests (tests/test_cuda_kernels_attention.py,
// through ctypes). Strides are (batch, seq, head) in elements, as int64[3]. Each returns the launcher's message, or
// NULL on success.
#include "../attention/attention.h"

namespace {
fastclip::AttnStrides strides(const int64_t* s) { return fastclip::AttnStrides{s[0], s[1], s[2]}; }

fastclip::AttnFwdParams fwd_params(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* q_str,
                                   const int64_t* k_str, const int64_t* v_str, int batch, int heads, int sq, int sk,
                                   int d, float scale, int causal, const uint8_t* key_padding, int64_t kp_stride,
                                   uint16_t* o, const int64_t* o_str, float* lse) {
  fastclip::AttnFwdParams p{};
  p.q = q;
  p.k = k;
  p.v = v;
  p.q_str = strides(q_str);
  p.k_str = strides(k_str);
  p.v_str = strides(v_str);
  p.batch = batch;
  p.heads = heads;
  p.sq = sq;
  p.sk = sk;
  p.d = d;
  p.softmax_scale = scale;
  p.causal = causal != 0;
  p.key_padding = key_padding;
  p.key_padding_stride = kp_stride;
  p.o = o;
  p.o_str = strides(o_str);
  p.lse = lse;
  return p;
}
}  // namespace

extern "C" {

const char* fc_flash_fwd(int bf16, const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* q_str,
                         const int64_t* k_str, const int64_t* v_str, int batch, int heads, int sq, int sk, int d,
                         float scale, int causal, const uint8_t* key_padding, int64_t kp_stride, uint16_t* o,
                         const int64_t* o_str, float* lse) {
  fastclip::AttnFwdParams p = fwd_params(q, k, v, q_str, k_str, v_str, batch, heads, sq, sk, d, scale, causal,
                                         key_padding, kp_stride, o, o_str, lse);
  return bf16 ? fastclip::flash_fwd_bf16(p, nullptr) : fastclip::flash_fwd_fp16(p, nullptr);
}

// Workspace size for the backward of these sizes (bytes).
size_t fc_flash_bwd_workspace(int batch, int heads, int sq, int sk, int d) {
  fastclip::AttnBwdParams p{};
  p.fwd.batch = batch;
  p.fwd.heads = heads;
  p.fwd.sq = sq;
  p.fwd.sk = sk;
  p.fwd.d = d;
  return fastclip::flash_bwd_workspace_bytes(p);
}

const char* fc_flash_bwd(int bf16, const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* q_str,
                         const int64_t* k_str, const int64_t* v_str, int batch, int heads, int sq, int sk, int d,
                         float scale, int causal, const uint8_t* key_padding, int64_t kp_stride, const uint16_t* o,
                         const int64_t* o_str, const float* lse, const uint16_t* dout, const int64_t* dout_str,
                         uint16_t* dq, uint16_t* dk, uint16_t* dv, void* workspace) {
  fastclip::AttnBwdParams p{};
  p.fwd = fwd_params(q, k, v, q_str, k_str, v_str, batch, heads, sq, sk, d, scale, causal, key_padding, kp_stride,
                     const_cast<uint16_t*>(o), o_str, const_cast<float*>(lse));
  p.dout = dout;
  p.dout_str = strides(dout_str);
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  return bf16 ? fastclip::flash_bwd_bf16(p, workspace, nullptr) : fastclip::flash_bwd_fp16(p, workspace, nullptr);
}

}  // extern "C"
