// Host-side launcher conventions shared by the kernels (.cu), the torch bindings (ops.cpp) and the emulator harness.
// Nothing here needs CUDA or torch headers.
//
// Every launcher returns nullptr on success, or a static message (a failed argument check, or the CUDA error of
// the launch). `stream` is a cudaStream_t (ignored by the emulator). 16-bit tensors are passed as uint16_t
// pointers whatever their type; the launcher's name says the type (fp16, bf16).
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace fastclip {
// cp.async and ldmatrix move 16-byte rows: every tensor the kernels read or write starts on a 16-byte boundary.
inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }
}  // namespace fastclip
