// fp16 instantiation of the contrastive loss kernels (contrastive_kernels.cuh).
#include "contrastive_kernels.cuh"

namespace fastclip {

const char* contrastive_fwd_fp16(const ContrastiveFwdParams& p, void* stream) {
  return contrastive_detail::fwd_launch<fc::Fp16>(p, stream);
}

const char* contrastive_bwd_fp16(const ContrastiveBwdParams& p, void* stream) {
  return contrastive_detail::bwd_launch<fc::Fp16>(p, stream);
}

}  // namespace fastclip
