"""python -m fastclip.build: compile the CUDA extension now, on this machine (JIT, with ninja).

For a fastclip installed without the extension (a plain pip install) on a machine with nvcc and a CUDA build of
torch. The library goes to ~/.cache/fastclip/torch-<version>/ (or --out DIR), and fastclip loads it from there
when fastclip._C itself is absent. That folder is keyed on the torch version only: every Python environment on this
machine with the same torch and no fastclip._C of its own loads it, so building from one changes them all.
"""
from __future__ import annotations

import argparse
import os
import sys

from fastclip.build import DEFAULT_ARCHS, default_out_dir, extension_kwargs, find_cuda_home


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastclip.build", description=__doc__.strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="build directory (default: ~/.cache/fastclip/torch-<version>)")
    p.add_argument("--archs", help=f"CUDA architectures (default: $FASTCLIP_CUDA_ARCHS or {DEFAULT_ARCHS!r})")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    home, how = find_cuda_home()
    if home is None:
        print(f"{how}: set CUDA_HOME to the toolkit's folder (the one holding bin/nvcc)", file=sys.stderr)
        return 2
    os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported, just below
    print(f"CUDA toolkit: {home} ({how})")

    import torch
    from torch.utils.cpp_extension import load

    if torch.version.cuda is None:
        print(f"torch {torch.__version__} is a CPU-only build; the extension needs a CUDA build of torch",
              file=sys.stderr)
        return 2
    out = args.out or default_out_dir()
    if not args.out:
        print(f"building into {out}: every Python environment on this machine with torch {torch.__version__} and "
              f"no fastclip._C of its own loads the library from there (--out DIR builds elsewhere; "
              f"FASTCLIP_CUDA_EXT=DIR/_C.so then loads it)")
    os.makedirs(out, exist_ok=True)
    kw = extension_kwargs(archs=args.archs)
    load(name="_C", sources=kw["sources"], extra_include_paths=kw["include_dirs"], extra_cflags=kw["cxx_flags"],
         extra_cuda_cflags=kw["nvcc_flags"], build_directory=out, verbose=not args.quiet, is_python_module=False)
    print(f"built {os.path.join(out, '_C.so')}; fastclip loads it when fastclip._C is absent "
          f"(check: fastclip info)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
