"""Whole ``fastclip train`` runs in subprocesses: kill -9 and --resume reproduce the uninterrupted losses; two gloo
processes at global batch B give the loss curve of one process at B."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--data", "synthetic", "--batch-size", "8", "--log-every", "1", "--eval-samples", "24", "--seed", "5"]


def _env():
    # the same threads in every run, so the CPU kernels reduce in the same order
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _train(*argv, timeout=600):
    res = subprocess.run([sys.executable, "-m", "fastclip", "train", *argv], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows}, [r["step"] for r in rows]


def test_kill_and_resume_reproduces_losses(tmp_path):
    steps = ["--steps", "12", "--save-every", "3"]
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    _train(*COMMON, *steps, "--out", ref)
    proc = subprocess.Popen([sys.executable, "-m", "fastclip", "train", *COMMON, *steps, "--out", killed], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill -9 between two checkpoints, after step 4
        if os.path.exists(metrics) and os.path.exists(os.path.join(killed, "checkpoints", "step_00000003.pt")):
            with open(metrics) as f:
                if any(json.loads(line)["step"] >= 4 for line in f if line.strip()):
                    break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _train("--resume", killed)
    want, _ = _losses(ref)
    got, order = _losses(killed)
    assert order == list(range(1, 13))  # steps a killed run logged after its checkpoint are not repeated
    for step in range(1, 13):
        assert abs(got[step] - want[step]) <= 1e-6 * abs(want[step]), (step, got[step], want[step])


def test_two_gloo_processes_equal_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _train(*COMMON, "--steps", "5", "--out", one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastclip",
           "train", *COMMON, "--steps", "5", "--micro-batch", "3", "--out", two]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want, _ = _losses(one)
    got, order = _losses(two)
    assert order == list(range(1, 6))
    for step in order:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])
    with open(os.path.join(two, "config.json")) as f:
        config = json.load(f)
    assert config["world_size"] == 2 and config["local_batch"] == 4
