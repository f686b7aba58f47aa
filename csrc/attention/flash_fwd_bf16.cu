// bf16 instantiation of the flash attention forward (flash_fwd.cuh).
#include "flash_fwd.cuh"

namespace fastclip {

const char* flash_fwd_bf16(const AttnFwdParams& p, void* stream) {
  return attn_detail::flash_fwd_launch<fc::Bf16>(p, stream);
}

}  // namespace fastclip
