"""Build script. Static metadata lives in pyproject.toml.

The C++/CUDA extension ``fastclip._C`` is compiled only on request (``FASTCLIP_BUILD_CUDA=1``); torch is imported
only then, so a plain ``pip install`` works on machines without CUDA or a GPU.
"""
import os

from setuptools import setup


def _cuda_extensions():
    if os.environ.get("FASTCLIP_BUILD_CUDA", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension  # noqa: F401  (imported only when asked to build)

    raise SystemExit("FASTCLIP_BUILD_CUDA=1: the CUDA extension has no sources yet (see csrc/README.md).")


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
