"""The tuned-config table: lookup by (op, arch, dtype, d, N bucket), the launchers' use of it, and the tuner's
selection and merge logic (with a fake timer: no GPU here; the committed table is unmeasured until a GPU run)."""
import importlib.util
import json
import os

import pytest
import torch

from fastclip.ops import tuned
from fastclip.ops.contrastive import triton as C
from fastclip.ops.siglip import triton as S

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("tune_triton", os.path.join(HERE, "..", "benchmarks", "tune_triton.py"))
tune_triton = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tune_triton)

BWD = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_D=256, num_warps=4, NUM_STAGES=3)


@pytest.fixture
def on_sm90(monkeypatch, tmp_path):
    """A pretend sm_90 GPU with a one-entry table, launchers out of interpreter mode (configs only: no launch)."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"entries": [dict(op="contrastive_bwd", arch="sm_90", dtype="bfloat16", d=512,
                                                 n=65536, config=BWD)]}))
    monkeypatch.setattr(tuned, "_table", lambda: tuned.load_table(str(path)))
    monkeypatch.setattr(tuned, "_arch", lambda index: "sm_90")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(C, "triton_interpret", lambda: False)
    monkeypatch.setattr(S, "triton_interpret", lambda: False)


def test_buckets():
    assert [tuned.n_bucket(n) for n in (1, 4096, 4097, 65536, 10**7)] == [4096, 4096, 16384, 65536, 262144]
    assert [tuned.d_bucket(d) for d in (8, 16, 500, 512, 768)] == [16, 16, 512, 512, 1024]


def test_launcher_reads_table_then_static(on_sm90):
    assert C.bwd_config(40000, 500, torch.bfloat16) == BWD  # same d and N buckets
    static = C.bwd_config(40000, 500, torch.float16)  # no fp16 entry: the static table's row
    assert static == dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=256, num_warps=8, NUM_STAGES=2)
    assert C.bwd_config(300000, 512, torch.bfloat16) != BWD  # another N bucket
    assert C.fwd_config(65536, 512, torch.bfloat16) == C.FWD_CONFIGS["16bit"]
    with tuned.forced("siglip_grad", BWD):
        assert S.config(1000, 64, torch.float32, True) == BWD


def test_committed_table_parses_and_names_known_configs():
    for (op, arch, dtype, d, n), cfg in tuned.load_table().items():
        assert op in tune_triton.OPS and arch.startswith("sm_") and n in tuned.N_BUCKETS
        assert {"BLOCK_M", "BLOCK_N", "num_warps"} <= set(cfg)


def test_tune_picks_fastest_skips_failures_and_merges(tmp_path):
    def fake_time(op, n, d, dtype, cfg):
        if cfg.get("NUM_STAGES") == 1:
            raise RuntimeError("out of resources")  # a config the compiler rejects
        return 1.0 / cfg["BLOCK_N"] + 0.1 * cfg["num_warps"]  # fastest: largest BLOCK_N, fewest warps

    entries = tune_triton.tune([("contrastive_bwd", 65536, 768, torch.bfloat16)], fake_time, "sm_90")
    assert len(entries) == 1
    e = entries[0]
    assert (e["op"], e["arch"], e["dtype"], e["d"], e["n"]) == ("contrastive_bwd", "sm_90", "bfloat16", 1024, 65536)
    space = tune_triton.candidates("contrastive_bwd", 65536, 768, torch.bfloat16)
    assert e["config"] == min((c for c in space if c["NUM_STAGES"] != 1), key=lambda c: fake_time(0, 0, 0, 0, c))

    path = tmp_path / "table.json"
    keep = dict(op="siglip_grad", arch="sm_80", dtype="float16", d=64, n=4096, config=BWD)
    old = dict(e, config=dict(BWD, BLOCK_N=16))
    path.write_text(json.dumps({"about": "x", "entries": [keep, old]}))
    tune_triton.merge_into(str(path), entries)
    table = json.loads(path.read_text())
    assert table["about"] == "x" and keep in table["entries"] and entries[0] in table["entries"]
    assert old not in table["entries"]
