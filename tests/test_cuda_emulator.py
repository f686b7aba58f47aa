"""The CPU emulator of csrc/common/device.cuh checks itself: one warp multiplies matrices through ldmatrix (plain
and .trans), mma.sync m16n8k16 and cp.async, and the 16-bit conversions round to nearest even
(csrc/tests/primitives_selftest.cu). The CUDA kernels' emulated tests (test_cuda_kernels_*.py) rest on this.
"""
import subprocess

import pytest

from . import emulator

pytestmark = pytest.mark.skipif(emulator.compiler_missing() is not None, reason=str(emulator.compiler_missing()))


SELFTEST = emulator.CSRC / "tests" / "primitives_selftest.cu"


def _run_selftest(src, tmp_path):
    exe = tmp_path / "selftest"
    subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-DFASTCLIP_EMULATE", "-Wall", f"-I{emulator.CSRC}",
                    "-x", "c++", str(src), "-o", str(exe)], check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)


def test_primitives_selftest(tmp_path):
    res = _run_selftest(SELFTEST, tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stdout + res.stderr


@pytest.mark.parametrize("call", ["ldmatrix_x4_trans"] + [pytest.param(c, marks=pytest.mark.slow) for c in
                                                          ("ldmatrix_x2_trans", "ldmatrix_x4", "ldmatrix_x2")])
def test_selftest_exercises_every_ldmatrix_form(call, tmp_path):
    """Each ldmatrix form the kernels use is checked: the self-test fails when that call loads the other layout."""
    text = SELFTEST.read_text()
    other = call.removesuffix("_trans") if call.endswith("_trans") else call + "_trans"
    assert f"fc::{call}(" in text, f"primitives_selftest.cu does not exercise {call}"
    mutated = tmp_path / "mutated.cu"
    mutated.write_text(text.replace('#include "../common/device.cuh"', '#include "common/device.cuh"')
                       .replace(f"fc::{call}(", f"fc::{other}("))
    res = _run_selftest(mutated, tmp_path)
    assert res.returncode == 1 and res.stdout.startswith("FAIL"), res.stdout + res.stderr


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
