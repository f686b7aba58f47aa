"""``python -m fastclip.info``: versions, devices, and every backend of every op, available or not, and why."""
from __future__ import annotations

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
            lines.append(f"  {name:<10} {'unavailable: ' + why if why else 'available'}  [{limits}]")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
