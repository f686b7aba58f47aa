"""fastclip info (or python -m fastclip.info): versions, GPU, every backend of every op (available or not, and
why), which backend auto picks for typical inputs on this machine, the CUDA extension and the built-in models."""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def _versions() -> dict:
    import fastclip

    out = {"fastclip": fastclip.__version__, "python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        out["triton"] = f"not importable ({type(e).__name__})"
    out["cuda (torch build)"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        out["gpu"] = f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
    else:
        out["gpu"] = "none"
    return out


def report() -> str:
    import fastclip.ops  # noqa: F401  (registers every op's rows)
    from fastclip.dispatch import _BACKEND_UNAVAILABLE, AUTO_ORDER, ops, supports

    lines = [f"{k:>20}: {v}" for k, v in _versions().items()]
    lines.append("\nbackends (auto tries them in this order)")
    for name in AUTO_ORDER:
        why = _BACKEND_UNAVAILABLE.get(name, lambda: None)()
        lines.append(f"  {name:<10} {'unavailable: ' + why if why else 'available'}")
    for op in ops():
        lines.append(f"\n{op}")
        table = supports(op)
        for name in AUTO_ORDER:
            row = table.get(name)
            if row is None:
                lines.append(f"  {name:<10} no kernel for this op in this version")
                continue
            why = row.unavailable()
            dtypes = ",".join(sorted(str(d).replace("torch.", "") for d in row.dtypes))
            limits = f"devices={','.join(sorted(row.devices))} dtypes={dtypes}"
            if row.max_dim:
                limits += f" max {row.dim_name}={row.max_dim}"
            limits += "".join(f" max {name}={limit}" for name, limit in row.max_sizes.items())
            lines.append(f"  {name:<10} {'unavailable: ' + why if why else 'available'}  [{limits}]")
    return "\n".join(lines)


# (op, dtype, dim) of typical calls: losses on CLIP's embedding widths, attention at CLIP's head dim
TYPICAL = [("contrastive_loss", torch.bfloat16, 512), ("contrastive_loss", torch.float32, 768),
           ("siglip_loss", torch.bfloat16, 768), ("flash_attention", torch.bfloat16, 64),
           ("flash_attention", torch.float32, 64)]


def auto_choices() -> str:
    """What ``backend="auto"`` runs for :data:`TYPICAL` inputs on each device here (FASTCLIP_BACKEND included)."""
    from fastclip.dispatch import BackendError, select

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = ["\nauto picks, for typical inputs on this machine" + (
        f" (FASTCLIP_BACKEND={os.environ['FASTCLIP_BACKEND']})" if os.environ.get("FASTCLIP_BACKEND") else "")]
    for op, dtype, dim in TYPICAL:
        for dev in devices:
            try:
                picked = select(op, "auto", device=torch.device(dev), dtype=dtype, dim=dim).backend
            except (BackendError, ValueError) as e:
                picked = f"none ({str(e).splitlines()[0][:100]})"
            name = str(dtype).replace("torch.", "")
            lines.append(f"  {op:<17} {dev:<4} {name:<8} dim {dim:<4} -> {picked}")
    if not torch.cuda.is_available():
        lines.append("  (no GPU here: on a CUDA GPU auto takes triton, or cuda where a committed benchmark measured "
                     "it faster)")
    return "\n".join(lines)


def extension_and_models() -> str:
    from fastclip import list_models
    from fastclip.build import default_out_dir

    lib = os.path.join(default_out_dir(), "_C.so")
    lines = [f"\nJIT-built CUDA extension: {lib}"]
    lines.append("  present: every Python environment with this torch version on this machine loads it (when its "
                 "fastclip has no fastclip._C)" if os.path.exists(lib) else "  absent (python -m fastclip.build)")
    models = list_models()
    lines.append(f"\nmodels: {len(models)} architectures (fastclip.list_models()): {', '.join(models)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip info", description=__doc__.strip())
    p.parse_args(argv)
    print(report())
    print(auto_choices())
    print(extension_and_models())
    return 0


if __name__ == "__main__":
    sys.exit(main())
