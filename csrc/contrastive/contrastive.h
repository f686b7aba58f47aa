// CLIP contrastive loss on tensor cores: the log-sum-exp pass and the gradient pass.
//
// Units: the kernels work in base 2. With s_ij = scale * <a_i, b_j> (fp32 accumulation of fp16/bf16 products),
// t_ij = s_ij * log2(e). Statistics are kept as (max m, rest) with rest = sum_j exp2(t_ij - m) - 1, the maxima
// counted as exactly 1 each and 1 + rest never formed: when the model is confident (p_ii -> 1 at scale 100) rest
// is ~1e-6 .. 1e-12, which 1 + rest in fp32 would round to nothing, and the loss -log p_ii is ln(2) log2(1 + rest).
// The diagonal logits t_ii come from the caller (`diag`) and replace the tiles' own: forward and backward then see
// the very same t_ii whatever their tiling (a split-K recompute rounds differently, 1e-5 at |t| = 144, which would
// swamp 1 - p_ii), and m_i - t_ii is exactly 0 where the diagonal is the row's max.
#pragma once
#include "../common/api.h"

namespace fastclip {

struct ContrastiveFwdParams {
  const uint16_t* image;  // (n, d); rows `image_stride` elements apart, the d elements of a row contiguous
  const uint16_t* text;   // (n, d); rows `text_stride` elements apart
  int64_t image_stride, text_stride;
  int n, d;               // n >= 1; 8 <= d <= 2048, d % 8 == 0; pointers and strides 16-byte aligned (stride % 8 == 0)
  const float* scale;     // device pointer, 1 element (read in the kernel: no host sync)
  const float* diag;      // (n): t_ii = scale log2(e) <image_i, text_i> in fp32, as the caller computed it
  // outputs
  float* row_max;         // (n): m_i = max_j t_ij                 (rows: image i against every text j)
  float* row_rest;        // (n): sum_j exp2(t_ij - m_i) - 1, the maxima counted as exactly 1
  // (n) packed column statistics over i for each text column j: low 32 bits = max_i t_ij (float bits), high 32
  // bits = its rest (float bits). The caller fills it with (-inf, -1), the empty partial, before the launch; kernels
  // merge into it with 64-bit atomicCAS. Read back as a (n, 2) float32 view on a little-endian host.
  unsigned long long* col_packed;
};

// Gradient of one side. Launched twice: (a, b, a_stats, b_stats) = (image, text, row, col) gives the image gradient;
// (text, image, col, row) gives the text gradient, since t^T = b a^T swaps the two softmaxes.
//   ds_ij = exp2(t_ij - lse2_a[i]) + exp2(t_ij - lse2_b[j]) - diag_coef * [i == j] - uniform_coef
//   grad_a[i, :] = sum_j ds_ij * b[j, :]            (fp32, contiguous (n, d))
// where t_ij = scale * log2(e) * <a_i, b_j> (t_ii = diag[i]), lse2_x[k] = x_stats[k] + x_stats[n + k] with
// x_stats[n + k] = log2(1 + rest) (from log1p, exact for a tiny rest). On the diagonal ds_ii is formed as
// (2^(t_ii - lse2_a) - 1) + (2^(t_ii - lse2_b) - 1) + (2 - diag_coef) - uniform_coef with an accurate expm1: each
// term is ~1 - p_ii, which 2^x - 1 would round away. ds is rounded to the input type before the second GEMM, after
// the subtraction (near one-hot rows keep their precision); in fp16 2^14 ds is rounded (and the fp32 sums scaled
// back), so that ds down to ~1e-12 is not flushed to zero. The caller scales grad_a by scale * grad_loss / (2n).
//   ds_dot[i] = sum_j ds_ij <a_i, b_j>              (fp32, (n); skipped when ds_dot is null)
// with ds in fp32 before that rounding and <a_i, b_j> the first GEMM's fp32 sum: the caller forms
// d(scale) = grad_loss / (2n) * sum_i ds_dot[i] from it. (sum_i <a_i, grad_a_i> is the same sum, but over the
// rounded ds: P + Q - 2 nearly cancels in a confident row, and bf16's 2^-8 of it is 1-3% of d(scale).)
struct ContrastiveBwdParams {
  const uint16_t* a;
  const uint16_t* b;
  int64_t a_stride, b_stride;
  int n, d;
  const float* scale;
  const float* diag;     // (n): t_ii, the same values the forward was given
  const float* a_stats;  // (2, n) as above: for row i of a, softmax over j
  const float* b_stats;  // (2, n): for row j of b, softmax over i
  float diag_coef;       // 2 * (1 - label_smoothing)
  float uniform_coef;    // 2 * label_smoothing / n
  float* grad_a;         // (n, d) fp32 output, fully overwritten
  float* ds_dot;         // (n) fp32 output, fully overwritten, or null
};

const char* contrastive_fwd_fp16(const ContrastiveFwdParams& p, void* stream);
const char* contrastive_fwd_bf16(const ContrastiveFwdParams& p, void* stream);
const char* contrastive_bwd_fp16(const ContrastiveBwdParams& p, void* stream);
const char* contrastive_bwd_bf16(const ContrastiveBwdParams& p, void* stream);

}  // namespace fastclip
