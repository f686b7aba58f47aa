"""Stage (a) of benchmarks/gpu_check.sh: are the Triton kernels right on this GPU, at the sizes that matter?

- the contrastive loss, Triton backend, bf16, in the *confident* regime a trained model reaches (each text feature
  close enough to its image's that the diagonal softmax p_ii is about 0.9999 at logit scale 100), at
  N = 16,384 and 65,536, D = 512 and 768: loss and every gradient against the ``torch`` backend in fp32 on the same
  bf16 inputs (the error bf16 itself costs is shown by the ``torch`` backend in bf16 on the same row set);
- flash attention, Triton backend, bf16, at CLIP's shapes (``fastclip bench attention``'s cases): output and
  gradients against SDPA (the ``torch`` backend) in fp32 on the same inputs;
- the cuBLAS bf16 matmul rate in this process (an 8192^3 product on random data): the ceiling the benchmarks'
  TFLOP/s are read against.

Each result is one CSV row, written and flushed as soon as it is measured (``--out DIR``/smoke.csv). The criteria:
gradients within 1% (relative norm) of the fp32 reference in the confident regime, the loss within 1e-3 nats,
attention within 1e-2 (bf16 operands). Exit status 1 when any check fails. ``--dry``: the CPU, tiny sizes, Triton's
interpreter (set ``TRITON_INTERPRET=1`` before running) and fp16 (the interpreter has no bf16), so the script itself
is tested without a GPU.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

FIELDS = ("check", "backend", "shape", "dtype", "quantity", "value", "limit", "ok", "seconds", "device")


class Sink:
    """smoke.csv, one row per measurement, flushed at once (a run cut off keeps what it finished)."""

    def __init__(self, path: str, device: str):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=FIELDS)
        if new:
            self.writer.writeheader()
        self.device, self.failed = device, 0

    def row(self, check, backend, shape, dtype, quantity, value, limit, seconds):
        ok = "" if limit is None else str(bool(value <= limit))  # NaN fails
        self.failed += ok == "False"
        self.writer.writerow(dict(check=check, backend=backend, shape=shape, dtype=dtype, quantity=quantity,
                                  value=f"{value:.4g}", limit="" if limit is None else f"{limit:g}", ok=ok,
                                  seconds=f"{seconds:.2f}", device=self.device))
        self.file.flush()
        os.fsync(self.file.fileno())
        print(f"{check:<12} {backend:<7} {shape:<40} {dtype:<5} {quantity:<16} {value:10.4g}"
              + ("" if limit is None else f"  limit {limit:g}  {'ok' if ok == 'True' else 'FAIL'}"), flush=True)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def confident_features(n: int, d: int, scale: float, device, dtype):
    """Unit image features and text features at cosine c from them, c chosen so that mean p_ii ~ 0.9999.

    Random unit vectors meet at cosines of spread 1/sqrt(D), so sum_j exp(scale * c_ij) ~ N exp(scale^2 / (2 D)) and
    p_ii ~ 1 - N exp(scale^2 / (2 D) - scale * c). c = (ln N + scale^2 / (2 D) + ln 1e4) / scale puts the gap at
    1e-4: the regime of a trained model, where (P + Q - 2) cancels. Where that c would exceed 0.99 (tiny D), 0.99.
    """
    c = min(0.99, (math.log(n) + scale ** 2 / (2 * d) + math.log(1e4)) / scale)
    img = F.normalize(torch.randn(n, d, device=device), dim=-1)
    u = torch.randn(n, d, device=device)
    u = F.normalize(u - (u * img).sum(-1, keepdim=True) * img, dim=-1)  # unit, orthogonal to img
    txt = c * img + math.sqrt(1 - c * c) * u
    return img.to(dtype), txt.to(dtype)


def loss_and_grads(image, text, scale, backend):
    import fastclip

    i, t, s = (x.detach().clone().requires_grad_() for x in (image, text, scale))
    loss = fastclip.contrastive_loss(i, t, s, backend=backend)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad


def _name(dtype):
    return str(dtype).replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")


def check_loss(sink, n, d, device, dtype):
    scale = torch.tensor(100.0, device=device)
    image, text = confident_features(n, d, scale.item(), device, dtype)
    shape = f"N={n},D={d}"
    with torch.no_grad():  # mean p_ii over the first rows (full rows of logits)
        k = min(n, 2048)
        p = torch.softmax(scale * image[:k].float() @ text.float().T, dim=1).diagonal()
    sink.row("loss", "-", shape, _name(dtype), "1 - mean p_ii", 1 - p.mean().item(), None, 0.0)
    ref = loss_and_grads(image.float(), text.float(), scale, "torch")
    for backend in ("triton", "torch"):
        t0 = time.perf_counter()
        got = loss_and_grads(image, text, scale, backend)
        secs = time.perf_counter() - t0
        criterion = backend == "triton"  # the torch backend in 16 bits is the context, not a criterion
        # the loss is near 0 here: its absolute error (nats); the gradients: relative norms
        sink.row("loss", backend, shape, _name(dtype), "abs err loss", abs(got[0].item() - ref[0].item()),
                 1e-3 if criterion else None, secs)
        for name, g, r in zip(("d_image", "d_text", "d_logit_scale"), got[1:], ref[1:]):
            sink.row("loss", backend, shape, _name(dtype), f"rel err {name}", rel(g, r), 1e-2 if criterion else None,
                     secs)


def check_attention(sink, case, b, s, h, d, causal, padded, device, dtype):
    import fastclip
    from fastclip.bench.attention import make_inputs

    q, k, v, mask, _ = make_inputs(b, s, h, d, dtype, device, causal, padded)
    dout = torch.randn_like(q)
    results = {}
    for backend, cast in (("triton", dtype), ("torch", torch.float32)):
        qq, kk, vv = (x.detach().to(cast).requires_grad_() for x in (q, k, v))
        t0 = time.perf_counter()
        out = fastclip.flash_attention(qq, kk, vv, causal=causal, key_padding_mask=mask, backend=backend)
        out.backward(dout.to(cast))
        results[backend] = (out, qq.grad, kk.grad, vv.grad, time.perf_counter() - t0)
    shape = f"{case}:B={b},S={s},H={h},D={d}" + (",causal" if causal else "") + (",pad" if padded else "")
    got, ref = results["triton"], results["torch"]
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        if padded:  # padded queries' rows are not compared: SDPA and fastclip define them differently
            keep = ~mask[:, :, None, None]
            g, r = g * keep, r * keep
        sink.row("attention", "triton", shape, _name(dtype), f"rel err {name}", rel(g, r), 1e-2, got[-1])


def matmul_peak(sink, device, n):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 10
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        secs = start.elapsed_time(end) / 1e3 / reps
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        secs = (time.perf_counter() - t0) / reps
    sink.row("peak", "cublas" if device.type == "cuda" else "cpu", f"{n}^3", "bf16", "TFLOP/s",
             2 * n ** 3 / secs / 1e12, None, secs * reps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_smoke.py", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".", help="folder for smoke.csv (default: here)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    args = p.parse_args(argv)
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
    device = torch.device("cpu" if args.dry else "cuda")
    if not args.dry and not torch.cuda.is_available():
        p.error("no CUDA GPU here (--dry runs the script on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are IEEE fp32
    torch.manual_seed(0)
    from fastclip.bench.attention import CPU_CASES, GPU_CASES
    from fastclip.bench.common import device_name

    os.makedirs(args.out, exist_ok=True)
    sink = Sink(os.path.join(args.out, "smoke.csv"), device_name(device))
    matmul_peak(sink, device, 256 if args.dry else 8192)
    dtype = torch.float16 if args.dry else torch.bfloat16  # the interpreter has no bf16
    sizes = [(64, 64), (80, 128)] if args.dry else [(16384, 512), (16384, 768), (65536, 512), (65536, 768)]
    for n, d in sizes:
        check_loss(sink, n, d, device, dtype)
    for case, (b, s, h, causal, padded) in (CPU_CASES if args.dry else GPU_CASES).items():
        check_attention(sink, case, b, s, h, 16 if args.dry else 64, causal, padded, device, dtype)
    print(f"{sink.failed} check(s) failed" if sink.failed else "all checks passed")
    return 1 if sink.failed else 0


if __name__ == "__main__":
    sys.exit(main())
