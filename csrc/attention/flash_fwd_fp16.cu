// fp16 instantiation of the flash attention forward (flash_fwd.cuh).
#include "flash_fwd.cuh"

namespace fastclip {

const char* flash_fwd_fp16(const AttnFwdParams& p, void* stream) {
  return attn_detail::flash_fwd_launch<fc::Fp16>(p, stream);
}

}  // namespace fastclip
