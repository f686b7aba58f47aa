"""benchmarks/gpu_check.sh and benchmarks/gpu_smoke.py, run on the CPU (GPU_CHECK_DRY=1): the script that gets a
GPU's few minutes is itself tested before a GPU sees it."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _run(tmp_path, timeout=900, **env):
    full = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    res = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=full, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    stages = (out / "stages.txt").read_text().splitlines()
    return out, stages, res.stdout


def test_stages_are_selected_logged_and_fit_the_device_tool(tmp_path):
    out, stages, _ = _run(tmp_path, GPU_CHECK_STAGES="d e")
    assert [s.split()[0] for s in stages] == ["d_cuda", "e_extra"] and all("rc=0" in s for s in stages)
    assert "skipped" in (out / "d_cuda.log").read_text()
    assert "bench topk: exit" not in (out / "e_extra.log").read_text()
    with open(out / "bench.csv") as f:  # e's top-k search: fastclip against the materialized torch.topk
        assert [(r["op"], r["provider"]) for r in csv.DictReader(f)] == [("topk_similarity", "fastclip"),
                                                                         ("topk_similarity", "torch.topk")]
    assert len(os.listdir(out)) <= 8  # the device tool returns at most 8 files


def test_a_spent_budget_skips_stages(tmp_path):
    _, stages, _ = _run(tmp_path, GPU_CHECK_BUDGET="5")
    assert stages == [f"{s} skipped: budget spent" for s in ("a_smoke", "b_bench", "c_tests", "d_cuda", "e_extra")]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """Every stage on the CPU: the smoke check's rows, the benchmarks' rows, the GPU tests' selection (all skipped)."""
    out, stages, stdout = _run(tmp_path)
    names = [s.split()[0] for s in stages]
    assert names == ["a_smoke", "b_bench", "c_tests", "d_cuda", "e_extra"], stdout[-2000:]
    # a_smoke exits 1 when a numerical check fails (a finding, not a broken script); the others succeed
    assert "rc=0" in stages[1] and "rc=0" in stages[2], stages
    assert all("TIMED OUT" not in s for s in stages), stages
    with open(out / "smoke.csv") as f:
        smoke = list(csv.DictReader(f))
    assert {r["check"] for r in smoke} == {"peak", "loss", "attention"}
    assert all(r["ok"] in ("", "True", "False") for r in smoke)
    attention = [r for r in smoke if r["check"] == "attention"]
    assert attention and all(r["ok"] == "True" for r in attention), attention
    with open(out / "bench.csv") as f:
        bench = list(csv.DictReader(f))
    assert {r["op"] for r in bench} == {"contrastive_loss", "flash_attention", "topk_similarity"}
    tests_log = (out / "c_tests.log").read_text()
    assert "skipped" in tests_log and "failed" not in tests_log  # GPU tests selected, each skipped on the CPU
    assert len(os.listdir(out)) <= 8


@pytest.mark.slow
def test_smoke_dry(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--dry", "--out",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode in (0, 1), res.stderr[-3000:]
    with open(tmp_path / "smoke.csv") as f:
        rows = list(csv.DictReader(f))
    p_gap = [float(r["value"]) for r in rows if r["quantity"] == "1 - mean p_ii"]
    assert p_gap and all(0 <= g < 1e-3 for g in p_gap)  # the confident regime: mean p_ii > 0.999
    assert res.returncode == (1 if any(r["ok"] == "False" for r in rows) else 0)
