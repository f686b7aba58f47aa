// torch bindings of fastclip's CUDA kernels: the fastclip::*_cuda operator schemas, their CUDA implementations
// (argument checks, allocation, launch on the current stream) and CPU implementations that only explain.
//
// Fake (meta) implementations for torch.compile live in Python (fastclip/ops/_extension.py). The kernels are reached
// through the plain launchers of csrc/*/*.h, so no .cu file includes torch headers (they build in seconds).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "attention/attention.h"
#include "contrastive/contrastive.h"

namespace fastclip {
namespace {

using at::Tensor;

std::string shape_of(const Tensor& t) {
  std::ostringstream s;
  s << t.sizes() << " " << c10::toString(t.scalar_type()) << " on " << t.device();
  return s.str();
}

bool is_16bit(const Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// A view the kernels can read in place: (rows, d) features or (B, S, H, D) attention inputs with a contiguous last
// dim, a 16-byte aligned start and every other stride a multiple of 8 elements (16 bytes), so each row is 16-byte
// aligned. Anything else is copied once (a rare path: fastclip's callers pass such views).
Tensor kernel_ready(const Tensor& t) {
  bool ok = t.stride(-1) == 1 && aligned16(t.data_ptr());
  for (int64_t i = 0; i + 1 < t.dim(); ++i) ok = ok && (t.size(i) == 1 || t.stride(i) % 8 == 0);
  return ok ? t : t.contiguous();
}

void check_launch(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, "fastclip::", op, ": kernel launch failed: ", err ? err : "");
}

// ----------------------------------------------------------------------------------------------------------------
// Contrastive loss

void check_contrastive_features(const char* op, const Tensor& image, const Tensor& text, const Tensor& scale) {
  TORCH_CHECK(image.dim() == 2 && text.dim() == 2, "fastclip::", op,
              ": image and text must be (N, D); got image ", shape_of(image), " and text ", shape_of(text));
  TORCH_CHECK(image.sizes() == text.sizes(), "fastclip::", op, ": image and text must have the same shape; got image ",
              shape_of(image), " and text ", shape_of(text));
  TORCH_CHECK(image.scalar_type() == text.scalar_type() && is_16bit(image), "fastclip::", op,
              ": image and text must both be float16 or both bfloat16; got image ", shape_of(image), " and text ",
              shape_of(text));
  TORCH_CHECK(image.size(0) >= 1, "fastclip::", op, ": the batch is empty (image ", shape_of(image), ")");
  const int64_t d = image.size(1);
  TORCH_CHECK(d >= 8 && d <= 2048 && d % 8 == 0, "fastclip::", op,
              ": the feature dim must be a multiple of 8 in [8, 2048]; got image ", shape_of(image));
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat, "fastclip::", op,
              ": scale must be a one-element float32 tensor; got ", shape_of(scale));
  TORCH_CHECK(image.device() == text.device() && image.device() == scale.device(), "fastclip::", op,
              ": image, text and scale must be on one device; got image on ", image.device(), ", text on ",
              text.device(), ", scale on ", scale.device());
}

// diag: the (N,) float32 base-2 diagonal logits t_ii = scale log2(e) <a_i, b_i> on the features' device.
void check_diag(const char* op, const Tensor& diag, const Tensor& like) {
  TORCH_CHECK(diag.dim() == 1 && diag.size(0) == like.size(0) && diag.scalar_type() == at::kFloat, "fastclip::", op,
              ": diag must be (", like.size(0), ") float32, the base-2 diagonal logits; got ", shape_of(diag));
  TORCH_CHECK(diag.device() == like.device(), "fastclip::", op, ": diag is on ", diag.device(),
              " but the features are on ", like.device());
}

void check_stats(const char* op, const char* name, const Tensor& stats, int64_t n, const Tensor& like) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == n && stats.scalar_type() == at::kFloat,
              "fastclip::", op, ": ", name, " must be (2, ", n, ") float32 as contrastive_stats_cuda returns it; got ",
              shape_of(stats));
  TORCH_CHECK(stats.device() == like.device(), "fastclip::", op, ": ", name, " is on ", stats.device(),
              " but the features are on ", like.device());
}

[[noreturn]] void refuse_cpu(const char* op, const Tensor& t) {
  TORCH_CHECK(false, "fastclip::", op, ": the CUDA kernels need CUDA tensors; got ", shape_of(t),
              ". On the CPU use backend='torch' (or 'triton' through TRITON_INTERPRET=1).");
}

std::tuple<Tensor, Tensor> contrastive_stats_cpu(const Tensor& image, const Tensor& text, const Tensor& scale,
                                                 const Tensor& diag) {
  check_contrastive_features("contrastive_stats_cuda", image, text, scale);
  check_diag("contrastive_stats_cuda", diag, image);
  refuse_cpu("contrastive_stats_cuda", image);
}

std::tuple<Tensor, Tensor> contrastive_grad_cpu(const Tensor& a, const Tensor& b, const Tensor& scale,
                                                const Tensor& diag, const Tensor& a_stats, const Tensor& b_stats,
                                                double, double, bool) {
  check_contrastive_features("contrastive_grad_cuda", a, b, scale);
  check_diag("contrastive_grad_cuda", diag, a);
  check_stats("contrastive_grad_cuda", "a_stats", a_stats, a.size(0), a);
  check_stats("contrastive_grad_cuda", "b_stats", b_stats, a.size(0), a);
  refuse_cpu("contrastive_grad_cuda", a);
}

// Returns (row_stats, col_stats), each (2, N) float32 in base 2: [0] = max_j t_ij, [1] = log2 sum_j 2^(t_ij - max)
// with t = scale * log2(e) * image @ text^T and t_ii = diag[i]; the natural log-sum-exp is
// ln(2) * (stats[0] + stats[1]). [1] is log1p(rest) / ln(2) from the kernels' rest = sum - 1, exact to rounding
// for a confident row's tiny rest.
std::tuple<Tensor, Tensor> contrastive_stats_cuda(const Tensor& image_in, const Tensor& text_in,
                                                  const Tensor& scale, const Tensor& diag_in) {
  const char* op = "contrastive_stats_cuda";
  check_contrastive_features(op, image_in, text_in, scale);
  check_diag(op, diag_in, image_in);
  TORCH_CHECK(image_in.is_cuda(), "fastclip::", op, ": expected CUDA tensors; got image ", shape_of(image_in));
  c10::cuda::CUDAGuard guard(image_in.device());
  Tensor image = kernel_ready(image_in), text = kernel_ready(text_in);
  const int64_t n = image.size(0), d = image.size(1);
  TORCH_CHECK(n <= (int64_t(1) << 30), "fastclip::", op, ": batch ", n, " is too large");
  auto f32 = image.options().dtype(at::kFloat);
  Tensor row = at::empty({2, n}, f32);
  // (max, rest) packed per column, initialised to the empty (-inf, -1): the kernel merges into it with 64-bit atomics
  Tensor col_packed = at::empty({n, 2}, f32);
  col_packed.select(1, 0).fill_(-std::numeric_limits<float>::infinity());
  col_packed.select(1, 1).fill_(-1.0);
  Tensor diag = diag_in.contiguous();
  ContrastiveFwdParams p{};
  p.image = static_cast<const uint16_t*>(image.data_ptr());
  p.text = static_cast<const uint16_t*>(text.data_ptr());
  p.image_stride = image.stride(0);
  p.text_stride = text.stride(0);
  p.n = static_cast<int>(n);
  p.d = static_cast<int>(d);
  Tensor scale_f = scale.reshape({1}).contiguous();
  p.scale = scale_f.data_ptr<float>();
  p.diag = diag.data_ptr<float>();
  p.row_max = row.data_ptr<float>();
  p.row_rest = row.data_ptr<float>() + n;
  p.col_packed = reinterpret_cast<unsigned long long*>(col_packed.data_ptr<float>());
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(image.scalar_type() == at::kHalf ? contrastive_fwd_fp16(p, stream) : contrastive_fwd_bf16(p, stream),
               op);
  constexpr double kLog2e = 1.4426950408889634;
  row[1].log1p_().mul_(kLog2e);
  Tensor col = col_packed.t().contiguous();
  col[1].log1p_().mul_(kLog2e);
  return {row, col};
}

// Returns (grad_a, ds_dot): grad_a[i] = sum_j ds_ij b_j, fp32 (N, D), with ds_ij = 2^(t_ij - lse2_a[i]) +
// 2^(t_ij - lse2_b[j]) - diag_coef [i == j] - uniform_coef; ds_dot[i] = sum_j ds_ij <a_i, b_j>, fp32 (N), from ds
// before the kernel rounds it for the second GEMM (d(scale) is formed from it), or an empty (0) tensor when
// with_ds_dot is false (the kernel then skips it). Image gradient: (image, text, row_stats, col_stats); text:
// (text, image, col, row), which needs no ds_dot.
std::tuple<Tensor, Tensor> contrastive_grad_cuda(const Tensor& a_in, const Tensor& b_in, const Tensor& scale,
                                                 const Tensor& diag_in, const Tensor& a_stats, const Tensor& b_stats,
                                                 double diag_coef, double uniform_coef, bool with_ds_dot) {
  const char* op = "contrastive_grad_cuda";
  check_contrastive_features(op, a_in, b_in, scale);
  check_diag(op, diag_in, a_in);
  check_stats(op, "a_stats", a_stats, a_in.size(0), a_in);
  check_stats(op, "b_stats", b_stats, a_in.size(0), a_in);
  TORCH_CHECK(a_in.is_cuda(), "fastclip::", op, ": expected CUDA tensors; got a ", shape_of(a_in));
  c10::cuda::CUDAGuard guard(a_in.device());
  Tensor a = kernel_ready(a_in), b = kernel_ready(b_in);
  Tensor as = a_stats.contiguous(), bs = b_stats.contiguous(), scale_f = scale.reshape({1}).contiguous();
  Tensor diag = diag_in.contiguous();
  Tensor grad = at::empty({a.size(0), a.size(1)}, a.options().dtype(at::kFloat));
  Tensor ds_dot = at::empty({with_ds_dot ? a.size(0) : 0}, a.options().dtype(at::kFloat));
  ContrastiveBwdParams p{};
  p.a = static_cast<const uint16_t*>(a.data_ptr());
  p.b = static_cast<const uint16_t*>(b.data_ptr());
  p.a_stride = a.stride(0);
  p.b_stride = b.stride(0);
  p.n = static_cast<int>(a.size(0));
  p.d = static_cast<int>(a.size(1));
  p.scale = scale_f.data_ptr<float>();
  p.diag = diag.data_ptr<float>();
  p.a_stats = as.data_ptr<float>();
  p.b_stats = bs.data_ptr<float>();
  p.diag_coef = static_cast<float>(diag_coef);
  p.uniform_coef = static_cast<float>(uniform_coef);
  p.grad_a = grad.data_ptr<float>();
  p.ds_dot = with_ds_dot ? ds_dot.data_ptr<float>() : nullptr;
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(a.scalar_type() == at::kHalf ? contrastive_bwd_fp16(p, stream) : contrastive_bwd_bf16(p, stream), op);
  return {grad, ds_dot};
}

// ----------------------------------------------------------------------------------------------------------------
// Flash attention

void check_attention(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                     const c10::optional<Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastclip::", op,
              ": q, k, v must be (batch, seq, heads, head_dim); got q ", shape_of(q), ", k ", shape_of(k), ", v ",
              shape_of(v));
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "fastclip::", op, ": q, k, v shapes do not agree; got q ", shape_of(q), ", k ", shape_of(k), ", v ",
              shape_of(v));
  TORCH_CHECK(is_16bit(q) && q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "fastclip::",
              op, ": q, k, v must all be float16 or all bfloat16; got q ", shape_of(q), ", k ", shape_of(k), ", v ",
              shape_of(v));
  const int64_t d = q.size(3);
  TORCH_CHECK(d >= 32 && d <= 128 && d % 8 == 0, "fastclip::", op,
              ": head_dim must be a multiple of 8 in [32, 128]; got q ", shape_of(q));
  TORCH_CHECK(q.size(0) >= 1 && q.size(1) >= 1 && k.size(1) >= 1 && q.size(2) >= 1, "fastclip::", op,
              ": empty inputs; got q ", shape_of(q), ", k ", shape_of(k));
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), "fastclip::", op,
              ": q, k, v must be on one device; got ", q.device(), ", ", k.device(), ", ", v.device());
  if (key_padding_mask.has_value()) {
    const Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.dim() == 2 && m.size(0) == k.size(0) && m.size(1) == k.size(1) && m.scalar_type() == at::kBool,
                "fastclip::", op, ": key_padding_mask must be (batch, seq_k) bool = (", k.size(0), ", ", k.size(1),
                "); got ", shape_of(m));
    TORCH_CHECK(m.device() == q.device(), "fastclip::", op, ": key_padding_mask is on ", m.device(),
                " but q is on ", q.device());
  }
}

AttnStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The key padding mask with its keys contiguous (the kernels read row b at key_padding + b * stride).
c10::optional<Tensor> padding_ready(const c10::optional<Tensor>& kpm) {
  if (!kpm.has_value()) return kpm;
  return kpm->stride(1) == 1 ? *kpm : kpm->contiguous();
}

AttnFwdParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& kpm,
                               bool causal, double softmax_scale) {
  AttnFwdParams p{};
  p.q = static_cast<const uint16_t*>(q.data_ptr());
  p.k = static_cast<const uint16_t*>(k.data_ptr());
  p.v = static_cast<const uint16_t*>(v.data_ptr());
  p.q_str = strides_of(q);
  p.k_str = strides_of(k);
  p.v_str = strides_of(v);
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(2));
  p.sq = static_cast<int>(q.size(1));
  p.sk = static_cast<int>(k.size(1));
  p.d = static_cast<int>(q.size(3));
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  if (kpm.has_value()) {
    p.key_padding = static_cast<const uint8_t*>(kpm->data_ptr());
    p.key_padding_stride = kpm->stride(0);
  }
  return p;
}

std::tuple<Tensor, Tensor> flash_attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const c10::optional<Tensor>& kpm, bool, double) {
  check_attention("flash_attn_fwd_cuda", q, k, v, kpm);
  refuse_cpu("flash_attn_fwd_cuda", q);
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cpu(const Tensor&, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Tensor&, const Tensor&,
                                                      const c10::optional<Tensor>& kpm, bool, double) {
  check_attention("flash_attn_bwd_cuda", q, k, v, kpm);
  refuse_cpu("flash_attn_bwd_cuda", q);
}

// Returns (out (B, Sq, H, D) contiguous, lse (B, H, Sq) float32, natural log, -inf where a query sees no key).
std::tuple<Tensor, Tensor> flash_attn_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                               const c10::optional<Tensor>& kpm_in, bool causal,
                                               double softmax_scale) {
  const char* op = "flash_attn_fwd_cuda";
  check_attention(op, q_in, k_in, v_in, kpm_in);
  TORCH_CHECK(q_in.is_cuda(), "fastclip::", op, ": expected CUDA tensors; got q ", shape_of(q_in));
  c10::cuda::CUDAGuard guard(q_in.device());
  Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  c10::optional<Tensor> kpm = padding_ready(kpm_in);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  AttnFwdParams p = attention_params(q, k, v, kpm, causal, softmax_scale);
  p.o = static_cast<uint16_t*>(out.data_ptr());
  p.o_str = strides_of(out);
  p.lse = lse.data_ptr<float>();
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(q.scalar_type() == at::kHalf ? flash_fwd_fp16(p, stream) : flash_fwd_bf16(p, stream), op);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> flash_attn_bwd_cuda(const Tensor& dout_in, const Tensor& q_in,
                                                       const Tensor& k_in, const Tensor& v_in, const Tensor& out_in,
                                                       const Tensor& lse, const c10::optional<Tensor>& kpm_in,
                                                       bool causal, double softmax_scale) {
  const char* op = "flash_attn_bwd_cuda";
  check_attention(op, q_in, k_in, v_in, kpm_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes() &&
                  dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "fastclip::", op, ": dout and out must match q; got dout ", shape_of(dout_in), ", out ",
              shape_of(out_in), ", q ", shape_of(q_in));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q_in.size(0) && lse.size(1) == q_in.size(2) &&
                  lse.size(2) == q_in.size(1) && lse.scalar_type() == at::kFloat,
              "fastclip::", op, ": lse must be (batch, heads, seq_q) float32 as the forward returns it; got ",
              shape_of(lse));
  TORCH_CHECK(q_in.is_cuda(), "fastclip::", op, ": expected CUDA tensors; got q ", shape_of(q_in));
  c10::cuda::CUDAGuard guard(q_in.device());
  Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  Tensor out = kernel_ready(out_in), dout = kernel_ready(dout_in), lse_c = lse.contiguous();
  c10::optional<Tensor> kpm = padding_ready(kpm_in);
  Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
         dv = at::empty(v.sizes(), v.options());
  AttnBwdParams p{};
  p.fwd = attention_params(q, k, v, kpm, causal, softmax_scale);
  p.fwd.o = static_cast<uint16_t*>(out.data_ptr());
  p.fwd.o_str = strides_of(out);
  p.fwd.lse = lse_c.data_ptr<float>();
  p.dout = static_cast<const uint16_t*>(dout.data_ptr());
  p.dout_str = strides_of(dout);
  p.dq = static_cast<uint16_t*>(dq.data_ptr());
  p.dk = static_cast<uint16_t*>(dk.data_ptr());
  p.dv = static_cast<uint16_t*>(dv.data_ptr());
  Tensor workspace = at::empty({static_cast<int64_t>(flash_bwd_workspace_bytes(p)) + 256},
                               q.options().dtype(at::kByte));
  void* ws = workspace.data_ptr();
  ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws) + 255) / 256 * 256);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(q.scalar_type() == at::kHalf ? flash_bwd_fp16(p, ws, stream) : flash_bwd_bf16(p, ws, stream), op);
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastclip

TORCH_LIBRARY(fastclip, m) {
  m.def("contrastive_stats_cuda(Tensor image, Tensor text, Tensor scale, Tensor diag) -> (Tensor, Tensor)");
  m.def("contrastive_grad_cuda(Tensor a, Tensor b, Tensor scale, Tensor diag, Tensor a_stats, Tensor b_stats, "
        "float diag_coef, float uniform_coef, bool with_ds_dot=True) -> (Tensor, Tensor)");
  m.def("flash_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
        "float softmax_scale) -> (Tensor, Tensor)");
  m.def("flash_attn_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? key_padding_mask, bool causal, float softmax_scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastclip, CUDA, m) {
  m.impl("contrastive_stats_cuda", &fastclip::contrastive_stats_cuda);
  m.impl("contrastive_grad_cuda", &fastclip::contrastive_grad_cuda);
  m.impl("flash_attn_fwd_cuda", &fastclip::flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd_cuda", &fastclip::flash_attn_bwd_cuda);
}

// CPU tensors get the argument checks, then a message saying which backends run on the CPU.
TORCH_LIBRARY_IMPL(fastclip, CPU, m) {
  m.impl("contrastive_stats_cuda", &fastclip::contrastive_stats_cpu);
  m.impl("contrastive_grad_cuda", &fastclip::contrastive_grad_cpu);
  m.impl("flash_attn_fwd_cuda", &fastclip::flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd_cuda", &fastclip::flash_attn_bwd_cpu);
}

// `import fastclip._C` loads this library (registering the ops above); the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastclip's CUDA kernels (torch.ops.fastclip.*_cuda)", -1,
                            nullptr};
  return PyModule_Create(&def);
}
