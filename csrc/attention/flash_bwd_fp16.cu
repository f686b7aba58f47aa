// fp16 instantiation of the flash attention backward (flash_bwd.cuh).
#include "flash_bwd.cuh"

namespace fastclip {

const char* flash_bwd_fp16(const AttnBwdParams& p, void* workspace, void* stream) {
  return attn_detail::flash_bwd_launch<fc::Fp16>(p, workspace, stream);
}

size_t flash_bwd_workspace_bytes(const AttnBwdParams& p) { return attn_detail::bwd_workspace_bytes(p); }

}  // namespace fastclip
