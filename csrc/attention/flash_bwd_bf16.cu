// bf16 instantiation of the flash attention backward (flash_bwd.cuh).
#include "flash_bwd.cuh"

namespace fastclip {

const char* flash_bwd_bf16(const AttnBwdParams& p, void* workspace, void* stream) {
  return attn_detail::flash_bwd_launch<fc::Bf16>(p, workspace, stream);
}

}  // namespace fastclip
