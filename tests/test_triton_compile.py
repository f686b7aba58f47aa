"""What the GPU will run, checked without a GPU: the Triton kernels compiled for sm_90 and sm_80 as a launch compiles
them (the JIT's own binder and specialization; see tests/triton_static.py), with per-kernel assertions on wgmma,
pipelined loads, spills and shared memory. Known shortfalls are listed, with their reasons, in
``triton_static.EXPECTED_FAILURES``: a new failure fails here, and so does a listed one that no longer fails.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
needs_nvidia_tools = pytest.mark.skipif(not os.path.exists(CUOBJDUMP),
                                        reason="this triton build ships no NVIDIA tools (not Linux x86-64)")


def _compile(*args):
    """Rows of tests/triton_static.py, run in a subprocess: TRITON_INTERPRET must be unset before triton's import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, os.path.join(HERE, "triton_static.py"), *args], capture_output=True,
                         text=True, env=env, timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _static():
    sys.path.insert(0, HERE)
    import triton_static

    return triton_static


def _unexpected(rows, *, strict):
    """Failures not in EXPECTED_FAILURES; with ``strict``, also listed expectations that every row now meets."""
    ts = _static()
    failures = ts.check_failures(rows)
    problems = [f"{kernel} fails {check} ({ts.CHECKS[check][2]}): " + "; ".join(
        f"sm_{r['arch']} {r['dtype']} {r['config']} warps={r['num_warps']} stages={r['num_stages']} regs="
        f"{r['registers']} local={r['local']} smem={r['shared']} dots={r['dots']}/{r['wgmma_dots']} wgmma "
        f"hgmma={r['hgmma']} ldgsts={r['ldgsts']}" for r in rs[:4])
        for (kernel, check), rs in failures.items() if (kernel, check) not in ts.EXPECTED_FAILURES]
    if strict:
        problems += [f"{key} is listed in EXPECTED_FAILURES but now passes everywhere: delete its line"
                     for key in ts.EXPECTED_FAILURES if key not in failures]
    for key, reason in ts.EXPECTED_FAILURES.items():
        if key in failures:
            print(f"expected failure {key}: {reason}")
    return problems


@needs_nvidia_tools
def test_typical_launches_sm90():
    """The launches of CLIP training (losses at N = 16k-65k, D = 512/768; ViT and text attention), bf16, sm_90."""
    rows = _compile("--arch", "90")
    assert {r["kernel"] for r in rows} >= {"contrastive_fwd", "contrastive_bwd", "siglip_loss", "siglip_grad",
                                           "attention_fwd", "attention_bwd"}
    for r in rows:
        print(r)
        assert r["registers"] > 0 and r["dots"] > 0, r
    fwd = next(r for r in rows if r["kernel"] == "contrastive_fwd")
    assert fwd["wgmma_dots"] == fwd["dots"] and fwd["hgmma"] > 0  # the facts NOTES.md states
    assert not _unexpected(rows, strict=False), "\n".join(_unexpected(rows, strict=False))


@pytest.mark.slow
@needs_nvidia_tools
def test_every_configuration_sm90_sm80(monkeypatch):
    """Every config the launchers pick over the input domain, every dtype and flag, for sm_90 and sm_80."""
    rows = _compile("--all", "--arch", "90", "80")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the config functions return the interpreter's tiles under 1
    ts = _static()
    # a config names its pipelining depth either as the launch option num_stages or as the constexpr NUM_STAGES
    compiled = {(r["kernel"], tuple(sorted(dict(r["config"], num_warps=r["num_warps"], **(
        {} if "NUM_STAGES" in r["config"] else {"num_stages": r["num_stages"]})).items()))) for r in rows}
    missing = ts.configs_of(ts.all_cases()) - compiled
    assert not missing, f"configs the launchers pick that were not compiled: {sorted(missing)[:5]}"
    problems = _unexpected(rows, strict=True)
    assert not problems, "\n".join(problems)


def test_domain_covers_every_config(monkeypatch):
    """The exhaustive domain reaches every config the launchers' config functions can return for supported inputs."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the config functions return the interpreter's tiles under 1
    ts = _static()
    missing = ts.every_config() - ts.configs_of(ts.all_cases())
    assert not missing, f"add inputs to all_cases() that reach: {sorted(missing)}"


def test_limits_match_the_registry():
    import fastclip  # noqa: F401  (registers every op's backends)
    from fastclip.dispatch import supports

    ts = _static()
    assert supports("contrastive_loss")["triton"].max_dim == ts.MAX_FEATURE_DIM
    assert supports("siglip_loss")["triton"].max_dim == ts.MAX_FEATURE_DIM
    assert supports("flash_attention")["triton"].max_dim == ts.MAX_HEAD_DIM
    assert supports("topk_similarity")["triton"].max_sizes == {"k": ts.MAX_TOPK}
