// Host-side launcher conventions shared by the kernels (.cu), the torch bindings (ops.cpp) and the emulator harness.
// Nothing here needs CUDA or torch headers.
//
// Every launcher returns nullptr on success, or a static message (a failed argument check, or the CUDA error of
// the launch). `stream` is a cudaStream_t (ignored by the emulator). 16-bit tensors are passed as uint16_t
// pointers whatever their type; the launcher's name says the type (fp16, bf16).
#pragma once
#include <stddef.h>
#include <stdint.h>
