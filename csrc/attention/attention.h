// Flash attention for CLIP's towers on tensor cores (fp16/bf16, head dims 32..128 with d % 8 == 0).
//
// Layout (B, S, H, D) with arbitrary batch/seq/head strides (in elements) and a contiguous head dim, so the q, k, v
// views of a packed (B, S, 3, H, D) projection are read in place. For each (b, h):
//   S = softmax_scale * Q K^T (sq x sk), entries of padded keys (key_padding[b, j] != 0) and, when causal, of j > i
//   (top-left aligned) at -inf; P = softmax(S) by rows; O = P V.
// A query row that sees no key gets O = 0, lse = -inf, and zero gradients.
#pragma once
#include "../common/api.h"

namespace fastclip {

struct AttnStrides {
  int64_t b, s, h;  // element strides of the batch, sequence and head dims; the head dim's stride is 1
};

struct AttnFwdParams {
  const uint16_t* q;  // (B, sq, H, D)
  const uint16_t* k;  // (B, sk, H, D)
  const uint16_t* v;  // (B, sk, H, D)
  AttnStrides q_str, k_str, v_str;
  int batch, heads, sq, sk, d;
  float softmax_scale;
  bool causal;
  const uint8_t* key_padding;  // (B, sk) bool (nonzero = padding, ignored) or nullptr
  int64_t key_padding_stride;  // elements between batches of key_padding
  // outputs
  uint16_t* o;  // (B, sq, H, D)
  AttnStrides o_str;
  float* lse;   // (B, H, sq) contiguous: natural log-sum-exp of each row of S (-inf for a row that sees no key)
};

struct AttnBwdParams {
  AttnFwdParams fwd;     // the forward's inputs, with o and lse as the forward produced them (read only here)
  const uint16_t* dout;  // (B, sq, H, D)
  AttnStrides dout_str;
  // outputs: contiguous (B, S, H, D) tensors, fully overwritten
  uint16_t* dq;
  uint16_t* dk;
  uint16_t* dv;
};

// Scratch the backward needs (bytes, 256-aligned pieces inside), allocated by the caller; contents need no init.
size_t flash_bwd_workspace_bytes(const AttnBwdParams& p);

const char* flash_fwd_fp16(const AttnFwdParams& p, void* stream);
const char* flash_fwd_bf16(const AttnFwdParams& p, void* stream);
const char* flash_bwd_fp16(const AttnBwdParams& p, void* workspace, void* stream);
const char* flash_bwd_bf16(const AttnBwdParams& p, void* workspace, void* stream);

}  // namespace fastclip
