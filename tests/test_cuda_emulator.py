"""The CPU emulator of csrc/common/device.cuh checks itself: one warp multiplies matrices through ldmatrix (plain
and .trans), mma.sync m16n8k16 and cp.async, and the 16-bit conversions round to nearest even
(csrc/tests/primitives_selftest.cu). The CUDA kernels' emulated tests (test_cuda_kernels_*.py) rest on this.
"""
import subprocess

import pytest

from . import emulator

pytestmark = pytest.mark.skipif(emulator.compiler_missing() is not None, reason=str(emulator.compiler_missing()))


def test_primitives_selftest(tmp_path):
    exe = tmp_path / "selftest"
    src = emulator.CSRC / "tests" / "primitives_selftest.cu"
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-DFASTCLIP_EMULATE", "-Wall", "-x", "c++", str(src),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stdout + res.stderr


def test_missing_cp_async_wait_is_fatal(tmp_path):
    # a kernel that issues a copy and exits without waiting: the emulator stops with a message, as the GPU would
    # leave the data unwritten
    src = tmp_path / "bad.cpp"
    src.write_text('#include "common/device.cuh"\n'
                   'FC_GLOBAL void k(const uint16_t* g) { FC_DYNAMIC_SMEM(s); fc::cp_async_16(s, g, true); '
                   'fc::cp_async_commit(); }\n'
                   'int main() { alignas(16) static uint16_t g[8]; '
                   'fc::launch(k, {1, 1, 1}, {32, 1, 1}, 64, nullptr, g); return 0; }\n')
    exe = tmp_path / "bad"
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-DFASTCLIP_EMULATE", f"-I{emulator.CSRC}", str(src),
                    "-o", str(exe)], check=True, capture_output=True, text=True)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 86 and "never waited for" in res.stderr
