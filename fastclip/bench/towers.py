"""``fastclip bench towers``: a training step of CLIP's towers, fastclip against open_clip (eager and compiled).

A step is forward + backward of one tower (bf16 autocast on a GPU, fp32 on the CPU) on a batch of random images
or token ids (each text ends in end-of-text at a random length, then zero padding), with the same weights in every
provider. Reported: p20/p50/p80 ms, the peak memory one step adds beyond the weights, and TFLOP/s counted as
3x the forward's matmul FLOPs (linear layers and patch embedding) plus 3.5x the attention forward's
4 * B * S^2 * width (half when causal), as the design counts attention.

Providers: ``fastclip`` (attention through ``fastclip.flash_attention`` when this build has it, else PyTorch's
SDPA, noted in the row), ``fastclip+compile`` (``torch.compile``), ``open_clip`` (eager) and
``open_clip+compile``. Towers: ``vit-b-32``, ``vit-b-16``, ``vit-l-14`` (vision towers of those models),
``text`` (the ViT-B text tower: width 512, 12 layers, 77 tokens), ``siglip-b-16`` (ViT-B-16-SigLIP's image tower:
open_clip runs timm's ``vit_base_patch16_siglip_224`` with its "map" head, fastclip its own copy) and
``siglip-text`` (ViT-B-16-SigLIP's bidirectional text tower: width 768, 12 layers, 64 tokens, last-token pooling);
``tiny-vit``/``tiny-text``/``tiny-siglip`` are the CPU smoke configuration. QuickGELU (OpenAI's checkpoints) by
default for the CLIP towers (``--act gelu`` for nn.GELU); SigLIP's towers use their own GELU whatever ``--act``.

Defaults: on a GPU every tower at batch 256 (bf16 autocast); on the CPU the tiny towers at batch 2, eager only
(CPU timings say nothing about GPU speed). Each row is appended to ./fastclip-results/towers.csv by default
as soon as it is measured.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Tuple

import torch

from fastclip.bench.common import CsvWriter, Row, add_output_arguments, bench_parser, csv_path, environment, \
    format_table, is_oom, peak_memory_mb, quantiles, \
    time_fn


# tower name -> (kind, open_clip-style cfg, embed_dim)
TOWERS: Dict[str, Tuple[str, dict, int]] = {
    "vit-b-32": ("vision", dict(image_size=224, layers=12, width=768, patch_size=32), 512),
    "vit-b-16": ("vision", dict(image_size=224, layers=12, width=768, patch_size=16), 512),
    "vit-l-14": ("vision", dict(image_size=224, layers=24, width=1024, patch_size=14), 768),
    "text": ("text", dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12), 512),
    "siglip-b-16": ("vision", dict(image_size=224, timm_model_name="vit_base_patch16_siglip_224", timm_pool="map",
                                   timm_proj="none", layers=12, width=768, patch_size=16), 768),
    "siglip-text": ("text", dict(context_length=64, vocab_size=32000, width=768, heads=12, layers=12,
                                 no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6}),
                    768),
    "tiny-vit": ("vision", dict(image_size=32, layers=2, width=64, patch_size=8), 32),
    "tiny-text": ("text", dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2), 32),
    "tiny-siglip": ("vision", dict(image_size=32, timm_model_name="vit_base_patch16_siglip_224", timm_pool="map",
                                   timm_proj="none", layers=2, width=64, patch_size=8,
                                   timm_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=2,
                                                    num_heads=2)), 64),
}
PROVIDERS = ("fastclip", "fastclip+compile", "open_clip", "open_clip+compile")


def _has_flash() -> bool:
    import fastclip.functional as functional

    return hasattr(functional, "flash_attention")


def build_tower(provider: str, tower: str, quick_gelu: bool, device: torch.device,
                state_dict: Optional[dict] = None) -> Tuple[torch.nn.Module, str]:
    """(module, note). fastclip towers load ``state_dict`` (open_clip's tower weights) strictly."""
    kind, cfg, embed_dim = TOWERS[tower]
    note = ""
    if provider.startswith("open_clip"):
        from open_clip.model import _build_text_tower, _build_vision_tower

        build = _build_vision_tower if kind == "vision" else _build_text_tower
        cfg = dict(cfg)
        timm_kwargs = cfg.pop("timm_kwargs", None)  # fastclip's reduced trunk: open_clip's TimmModel gets timm's
        model = build(embed_dim, cfg, quick_gelu=quick_gelu)
        if timm_kwargs:
            import timm

            model.trunk = timm.create_model(cfg["timm_model_name"], num_classes=0, global_pool="map", **timm_kwargs)
    else:
        from fastclip.models.model import build_text_tower, build_vision_tower

        attn_impl = "fastclip" if _has_flash() else "sdpa"
        if attn_impl == "sdpa":
            note = "attn=sdpa (no fastclip.flash_attention in this build)"
        build = build_vision_tower if kind == "vision" else build_text_tower
        model = build(embed_dim, cfg, quick_gelu=quick_gelu, attn_impl=attn_impl)
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
    model = model.to(device).train()
    if provider.endswith("+compile"):
        model = torch.compile(model)
    return model, note


def make_inputs(tower: str, batch: int, device: torch.device) -> torch.Tensor:
    kind, cfg, _ = TOWERS[tower]
    if kind == "vision":
        return torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device)
    S = cfg["context_length"]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, min(49406, cfg["vocab_size"]), (batch, S), generator=g)
    lengths = torch.randint(3, S + 1, (batch,), generator=g)  # end-of-text position + 1
    pos = torch.arange(S)
    text = torch.where(pos < lengths[:, None] - 1, text, torch.zeros_like(text))
    openai = cfg["vocab_size"] == 49408
    text[torch.arange(batch), lengths - 1] = 49407 if openai else 1  # end-of-text (SigLIP's </s> is 1)
    if openai:
        text[:, 0] = 49406
    return text.to(device)


def step_flops(tower: str, batch: int) -> float:
    """Matmul FLOPs of one forward + backward (see the module docstring)."""
    kind, cfg, embed_dim = TOWERS[tower]
    C, L = cfg["width"], cfg["layers"]
    if kind == "vision":
        p = cfg["patch_size"]
        n = (cfg["image_size"] // p) ** 2
        S = n + (0 if "timm_model_name" in cfg else 1)  # SigLIP's trunk has no class token
        patch = 2 * batch * n * C * 3 * p * p
        causal = 1.0
    else:
        S = cfg["context_length"]
        patch = 0
        causal = 1.0 if cfg.get("no_causal_mask") else 0.5
    linear = 2 * batch * S * L * (4 * C * C + 8 * C * C) + patch + 2 * batch * C * embed_dim
    attention = 4 * batch * S * S * C * L * causal
    return 3 * linear + 3.5 * attention


def bench_provider(provider: str, tower: str, batch: int, quick_gelu: bool, device: torch.device, env: dict,
                   rep: int, ref_state: dict) -> Row:
    dtype_name = "bf16-autocast" if device.type == "cuda" else "fp32"
    base = dict(op="tower_train_step", provider=provider, mode="full", shape=f"{tower},B={batch}",
                dtype=dtype_name, **env)
    model, note = build_tower(provider, tower, quick_gelu, device,
                              None if provider.startswith("open_clip") else ref_state)
    x = make_inputs(tower, batch, device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(x)
        out.float().square().mean().backward()

    step()  # compile (for +compile) and allocate outside the measurements
    peak = peak_memory_mb(step, device)
    ms = time_fn(step, device, rep=rep)
    p20, p50, p80 = quantiles(ms)
    return Row(ms_p20=p20, ms_p50=p50, ms_p80=p80, peak_mem_mb=peak,
               tflops=step_flops(tower, batch) / (p50 * 1e-3) / 1e12, note=note, **base)


def run(args) -> List[Row]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    towers = args.tower or (["vit-b-32", "vit-b-16", "vit-l-14", "text", "siglip-b-16", "siglip-text"] if gpu
                            else ["tiny-vit", "tiny-text", "tiny-siglip"])
    batches = args.batch or ([256] if gpu else [2])
    providers = args.provider or (list(PROVIDERS) if gpu else ["fastclip", "open_clip"])
    quick_gelu = args.act == "quickgelu"
    env = environment(device)
    print(f"# towers on {env['device']} | torch {env['torch']} | {env['git_sha']} | act {args.act}", file=sys.stderr)
    try:
        import open_clip  # noqa: F401
    except ImportError:
        providers = [p for p in providers if not p.startswith("open_clip")]
        print("# open_clip is not installed: fastclip rows only (pip install open-clip-torch)", file=sys.stderr)
    rows: List[Row] = []
    sink = CsvWriter(csv_path(args, "towers.csv"))
    for tower in towers:
        # one set of weights (open_clip's init) for every provider
        ref_state = None
        if any(p.startswith("fastclip") for p in providers):
            try:
                src, _ = build_tower("open_clip", tower, quick_gelu, torch.device("cpu"))
                ref_state = src.state_dict()
            except ImportError:
                pass
        for batch in batches:
            for provider in providers:
                try:
                    row = bench_provider(provider, tower, batch, quick_gelu, device, env, args.rep, ref_state)
                except Exception as e:  # noqa: BLE001
                    if not is_oom(e):
                        raise
                    row = Row(op="tower_train_step", provider=provider, mode="full", shape=f"{tower},B={batch}",
                              dtype="bf16-autocast" if gpu else "fp32", note="OOM", **env)
                finally:
                    if gpu:
                        torch.cuda.empty_cache()
                    torch._dynamo.reset()
                rows.append(row)
                sink.write(row)
                print(format_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    sink.close()
    print(format_table(rows))
    if sink.path:
        print(f"\n{sink.count} rows appended to {sink.path}")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--tower", nargs="+", choices=sorted(TOWERS), help="towers to run")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes")
    p.add_argument("--provider", nargs="+", choices=PROVIDERS, help="providers (default: all on GPU)")
    p.add_argument("--act", choices=["quickgelu", "gelu"], default="quickgelu", help="MLP activation")
    p.add_argument("--rep", type=int, default=None, help="timed repetitions per case")
    add_output_arguments(p)


def main(argv=None) -> int:
    p = bench_parser("towers", __doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.rep is None:
        args.rep = 20 if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else 3
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

