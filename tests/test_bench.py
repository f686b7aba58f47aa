"""The benchmark harness and the main job (`fastclip bench loss`) work end to end on the CPU at tiny sizes."""
import os
import subprocess
import sys

import pytest
import torch

from fastclip.bench.common import CSV_FIELDS, format_table, quantiles, read_csv, time_fn
from fastclip.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quantiles_order():
    p20, p50, p80 = quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert p20 <= p50 <= p80 and p50 == 3.0
    assert quantiles([7.0]) == (7.0, 7.0, 7.0)


def test_time_fn_counts_calls():
    calls = []
    ms = time_fn(lambda: calls.append(1), torch.device("cpu"), warmup=2, rep=5)
    assert len(ms) == 5 and len(calls) == 7 and all(t >= 0 for t in ms)


def test_bench_loss_cli_writes_csv_and_plot(tmp_path, capsys):
    csv_path = tmp_path / "loss.csv"
    rc = cli_main(["bench", "loss", "--n", "64", "200", "--d", "16", "--mode", "fwd", "full", "--rep", "2",
                   "--provider", "open_clip", "torch", "reference", "triton", "--csv", str(csv_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "open_clip" in out and "unavailable here" in out  # triton on the CPU is not timed
    rows = read_csv(str(csv_path))
    assert list(rows[0].keys()) == list(CSV_FIELDS)
    measured = {(r["provider"], r["shape"], r["mode"]) for r in rows}
    assert ("torch", "N=200,D=16", "full") in measured and ("open_clip", "N=64,D=16", "fwd") in measured
    assert all(r["device"].startswith("CPU") and r["git_sha"] and float(r["ms_p50"]) > 0 for r in rows)
    full = [r for r in rows if r["mode"] == "full"]
    assert all(float(r["peak_mem_mb"]) >= 0 for r in full)
    pytest.importorskip("matplotlib")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), str(csv_path)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    pngs = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    assert pngs and all(os.path.getsize(tmp_path / p) > 1000 for p in pngs)


def test_cli_usage_and_info(capsys):
    assert cli_main([]) == 0
    assert "bench" in capsys.readouterr().out
    assert cli_main(["bench", "nope"]) == 2
    assert cli_main(["nope"]) == 2
    assert cli_main(["info"]) == 0
    assert "contrastive_loss" in capsys.readouterr().out


def test_format_table_handles_missing_values():
    from fastclip.bench.common import Row

    text = format_table([Row(op="x", provider="p", mode="full", shape="N=1", dtype="fp32", note="OOM")])
    assert "OOM" in text and "-" in text


def test_rows_are_written_and_flushed_as_measured(tmp_path):
    """A run cut off part way keeps every row it finished: the CSV holds each row before the next is measured."""
    from fastclip.bench.common import CsvWriter, Row

    path = tmp_path / "x.csv"
    with CsvWriter(str(path)) as w:
        for i in range(3):
            w.write(Row(op="x", provider="p", mode="full", shape=f"N={i}", dtype="fp32", ms_p50=1.0))
            assert [r["shape"] for r in read_csv(str(path))] == [f"N={j}" for j in range(i + 1)]


def test_bench_loss_keeps_rows_of_an_interrupted_run(tmp_path, monkeypatch):
    from fastclip.bench import loss

    real, calls = loss.bench_case, []

    def stop_at_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the time limit's SIGTERM/SIGINT in the middle of a sweep
        return real(*a, **k)

    monkeypatch.setattr(loss, "bench_case", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["bench", "loss", "--n", "32", "48", "--d", "8", "--mode", "fwd", "--rep", "1", "--provider",
                  "torch", "--csv", str(tmp_path / "loss.csv")])
    assert [(r["provider"], r["shape"]) for r in read_csv(str(tmp_path / "loss.csv"))] == [("torch", "N=32,D=8")]


def test_results_go_to_a_named_folder_not_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["bench", "loss", "--n", "16", "--d", "8", "--mode", "fwd", "--rep", "1", "--provider", "torch"]
    assert cli_main(args) == 0
    assert read_csv(str(tmp_path / "fastclip-results" / "loss.csv"))  # the default: ./fastclip-results/
    assert not (tmp_path / "benchmarks").exists()
    assert cli_main(args + ["--out", str(tmp_path / "mine")]) == 0
    assert read_csv(str(tmp_path / "mine" / "loss.csv"))
    # --save: the checkout's committed CSVs (redirected here, so the test leaves the checkout as it was)
    from fastclip.bench import common

    monkeypatch.setattr(common, "checkout_results_dir", lambda: str(tmp_path / "committed"))
    (tmp_path / "committed").mkdir()
    assert cli_main(args + ["--save"]) == 0
    assert read_csv(str(tmp_path / "committed" / "loss.csv"))
    with pytest.raises(SystemExit):
        cli_main(args + ["--save", "--out", "x"])


def test_checkout_results_dir_is_this_checkout():
    from fastclip.bench.common import checkout_results_dir

    assert checkout_results_dir() == os.path.join(ROOT, "benchmarks", "results")


@pytest.mark.parametrize("bench", ["loss", "siglip", "attention", "towers"])
def test_each_bench_has_its_own_help(bench, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", bench, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fastclip bench {bench} ")
    assert f"fastclip bench {bench}:" in out  # its own description, not another benchmark's
    assert "``" not in out and ":func:" not in out  # no reST markup in help
    assert "--out DIR" in out and "--save" in out


def test_version_and_command_help(capsys):
    import fastclip

    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastclip {fastclip.__version__}"
    with pytest.raises(SystemExit) as e:
        cli_main(["info", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fastclip info")
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "bench" in out and "`" not in out


def test_info_says_what_auto_picks(capsys):
    import torch

    from fastclip.dispatch import select

    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "auto picks" in out
    picked = select("contrastive_loss", "auto", device=torch.device("cpu"), dtype=torch.bfloat16, dim=512).backend
    assert any(line.split()[:3] == ["contrastive_loss", "cpu", "bfloat16"] and line.split()[-1] == picked
               for line in out.splitlines())
    import fastclip

    assert f"models: {len(fastclip.list_models())} architectures" in out
