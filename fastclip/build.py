"""``python -m fastclip.build``: compile the CUDA extension now, on this machine (JIT, with ninja).

For a fastclip installed without the extension (a plain ``pip install``) on a machine with nvcc and a CUDA build of
torch. The library goes to ``~/.cache/fastclip/`` (or ``--out``), named for the torch version, and fastclip loads it
from there when ``fastclip._C`` itself is absent. The install-time build (``FASTCLIP_BUILD_CUDA=1 pip install
--no-build-isolation -e .``, see setup.py) uses the same sources and flags, from :func:`extension_kwargs`.

This module must stay importable without torch (setup.py loads it by path before torch is known to exist).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_ARCHS = "80;90"


def sources(relative: bool = False) -> list:
    """ops.cpp (torch bindings) and one .cu per op and dtype family; csrc/emulate and csrc/tests are not built."""
    found = [os.path.join(CSRC, "ops.cpp")]
    for op in ("contrastive", "attention"):
        found += sorted(glob.glob(os.path.join(CSRC, op, "*.cu")))
    return [os.path.relpath(p, ROOT) for p in found] if relative else found


def arch_flags(archs: str | None = None) -> list:
    """-gencode flags for FASTCLIP_CUDA_ARCHS ("80;90" -> sm_80 and sm_90 SASS, plus compute_90 PTX)."""
    archs = archs if archs is not None else os.environ.get("FASTCLIP_CUDA_ARCHS", DEFAULT_ARCHS)
    items = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not items:
        raise ValueError(f"FASTCLIP_CUDA_ARCHS={archs!r} names no architecture (expected e.g. '80;90')")
    for a in items:
        if not a.rstrip("a").isdigit() or int(a.rstrip("a")) < 80:
            raise ValueError(f"FASTCLIP_CUDA_ARCHS: {a!r} is not a supported architecture (sm_80 or newer, e.g. 80, "
                             f"86, 89, 90, 90a)")
    flags = []
    for a in items:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    last = items[-1]
    flags += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
    return flags


def extension_kwargs(relative: bool = False, archs: str | None = None) -> dict:
    return {
        "sources": sources(relative),
        "include_dirs": [CSRC],
        "cxx_flags": ["-O3"],
        "nvcc_flags": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + arch_flags(archs),
    }


def default_out_dir() -> str:
    import torch

    tag = torch.__version__.replace("+", "_")
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "fastclip", f"torch-{tag}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclip.build", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="build directory (default: ~/.cache/fastclip/torch-<version>)")
    p.add_argument("--archs", help=f"CUDA architectures (default: $FASTCLIP_CUDA_ARCHS or {DEFAULT_ARCHS!r})")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    if torch.version.cuda is None:
        print(f"torch {torch.__version__} is a CPU-only build; the extension needs a CUDA build of torch",
              file=sys.stderr)
        return 2
    if CUDA_HOME is None:
        print("no CUDA toolkit found: set CUDA_HOME to the directory holding bin/nvcc", file=sys.stderr)
        return 2
    out = args.out or default_out_dir()
    os.makedirs(out, exist_ok=True)
    kw = extension_kwargs(archs=args.archs)
    load(name="_C", sources=kw["sources"], extra_include_paths=kw["include_dirs"], extra_cflags=kw["cxx_flags"],
         extra_cuda_cflags=kw["nvcc_flags"], build_directory=out, verbose=not args.quiet, is_python_module=False)
    print(f"built {os.path.join(out, '_C.so')}; fastclip loads it when fastclip._C is absent "
          f"(check: python -m fastclip.info)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
