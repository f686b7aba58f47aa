"""Small runs of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, synccheck) in benchmarks/gpu_check.sh:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/cuda_sanitize_case.py
"""
import torch

import fastclip


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for n, d in ((1, 8), (300, 136), (200, 1032)):  # odd tiles, the d tail, the large-D configuration
            img = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
            txt = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
            scale = torch.tensor(10.0, device="cuda", requires_grad=True)
            fastclip.contrastive_loss(img, txt, scale, label_smoothing=0.1, backend="cuda").backward()
        for b, s, h, d, causal, pad in ((2, 77, 2, 80, True, True), (1, 257, 2, 64, False, False),
                                        (2, 37, 1, 128, True, False), (1, 1, 1, 32, False, False)):
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            mask = (torch.rand(b, s, device="cuda") < 0.3) if pad else None
            fastclip.flash_attention(q, k, v, causal=causal, key_padding_mask=mask, backend="cuda").sum().backward()
    torch.cuda.synchronize()
    print("sanitize cases ran")


if __name__ == "__main__":
    main()
