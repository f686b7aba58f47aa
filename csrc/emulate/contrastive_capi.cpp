// extern "C" shims over the contrastive launchers for the CPU emulator tests (tests/test_cuda_kernels_contrastive.py,
// through ctypes). Each returns the launcher's message, or NULL on success.
#include "../contrastive/contrastive.h"

extern "C" {

const char* fc_contrastive_fwd(int bf16, const uint16_t* image, const uint16_t* text, int64_t image_stride,
                               int64_t text_stride, int n, int d, const float* scale, const float* diag,
                               float* row_max, float* row_rest, unsigned long long* col_packed) {
  fastclip::ContrastiveFwdParams p{};
  p.image = image;
  p.text = text;
  p.image_stride = image_stride;
  p.text_stride = text_stride;
  p.n = n;
  p.d = d;
  p.scale = scale;
  p.diag = diag;
  p.row_max = row_max;
  p.row_rest = row_rest;
  p.col_packed = col_packed;
  return bf16 ? fastclip::contrastive_fwd_bf16(p, nullptr) : fastclip::contrastive_fwd_fp16(p, nullptr);
}

const char* fc_contrastive_bwd(int bf16, const uint16_t* a, const uint16_t* b, int64_t a_stride, int64_t b_stride,
                               int n, int d, const float* scale, const float* diag, const float* a_stats,
                               const float* b_stats, float diag_coef, float uniform_coef, float* grad_a,
                               float* ds_dot) {
  fastclip::ContrastiveBwdParams p{};
  p.a = a;
  p.b = b;
  p.a_stride = a_stride;
  p.b_stride = b_stride;
  p.n = n;
  p.d = d;
  p.scale = scale;
  p.diag = diag;
  p.a_stats = a_stats;
  p.b_stats = b_stats;
  p.diag_coef = diag_coef;
  p.uniform_coef = uniform_coef;
  p.grad_a = grad_a;
  p.ds_dot = ds_dot;
  return bf16 ? fastclip::contrastive_bwd_bf16(p, nullptr) : fastclip::contrastive_bwd_fp16(p, nullptr);
}

}  // extern "C"
