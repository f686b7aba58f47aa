"""Build script. Static metadata lives in pyproject.toml.

The C++/CUDA extension ``fastclip._C`` is compiled only on request: ``FASTCLIP_BUILD_CUDA=1``. torch is imported
only then, so a plain ``pip install`` works on machines without CUDA or a GPU. It needs a CUDA build of torch and
nvcc (CUDA_HOME), not a GPU:

    FASTCLIP_BUILD_CUDA=1 pip install --no-build-isolation -e .
    FASTCLIP_BUILD_CUDA=1 python setup.py build_ext --inplace

``FASTCLIP_CUDA_ARCHS`` (default "80;90") lists the SASS targets; PTX for the last one is embedded too, so newer
GPUs can JIT it. ``MAX_JOBS`` bounds parallel compilation (ninja). The same source list and flags serve the JIT
build (``python -m fastclip.build``), through :func:`extension_kwargs` in fastclip/build/__init__.py.
"""
import importlib.util
import os

from setuptools import setup


def _build_module():
    # fastclip/build/__init__.py without importing fastclip (whose __init__ needs torch and the runtime dependencies)
    spec = importlib.util.spec_from_file_location(
        "_fastclip_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastclip", "build", "__init__.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_extensions():
    if os.environ.get("FASTCLIP_BUILD_CUDA", "0") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    kw = _build_module().extension_kwargs(relative=True)
    ext = CUDAExtension("fastclip._C", sources=kw["sources"], include_dirs=kw["include_dirs"],
                        extra_compile_args={"cxx": kw["cxx_flags"], "nvcc": kw["nvcc_flags"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
