"""fastclip.train: gradient caching, data (synthetic, CSV, webdataset), the loader's resume, options, NaN stop."""
import io
import json
import math
import os
import tarfile
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.models import CLIP, load_checkpoint
from fastclip.train import data as D
from fastclip.train.cli import main as train_main
from fastclip.train.cli import resolve
from fastclip.train.gradcache import backward_step
from fastclip.train.models import TINY_MODELS
from fastclip.train.loop import MAX_LOGIT_SCALE, NonFiniteLossError, Trainer, build_loss, cosine_lr, param_groups

MICRO = dict(embed_dim=16, vision_cfg=dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
             text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
@pytest.mark.parametrize("n, m", [(13, 4), (16, 16), (9, 1)])
def test_gradient_caching_equals_full_batch(loss_kind, n, m):
    # fp64: d(logit_scale) is a sum over all pairs that can nearly cancel at a random init, where fp32's reduction
    # order alone moved it by 3e-4 (relative) between the full and the cached batch
    siglip = loss_kind == "siglip"
    model = CLIP(**MICRO, init_logit_bias=-10.0 if siglip else None, init_logit_scale=math.log(10) if siglip
                 else math.log(1 / 0.07)).double()
    loss_fn = build_loss(loss_kind, None, 0, 1)
    images = torch.randn(n, 3, 16, 16, dtype=torch.float64)
    texts = torch.randint(1, 100, (n, 8))
    full = backward_step(model, loss_fn, images, texts)
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)
    cached = backward_step(model, loss_fn, images, texts, micro_batch=m)
    g_cached = _grads(model)
    assert torch.allclose(full, cached, rtol=1e-6, atol=0)
    assert g_full.keys() == g_cached.keys()
    for name, g in g_full.items():
        assert g.abs().sum() > 0, name  # every parameter, the logit scale and bias included, gets a gradient
        assert _rel(g_cached[name], g) < 1e-5, (name, _rel(g_cached[name], g))


def test_gradient_caching_bad_input():
    model = CLIP(**MICRO)
    loss_fn = build_loss("clip", None, 0, 1)
    with pytest.raises(ValueError, match="differ in batch size"):
        backward_step(model, loss_fn, torch.randn(4, 3, 16, 16), torch.randint(1, 100, (5, 8)), micro_batch=2)
    with pytest.raises(ValueError, match="micro_batch"):
        backward_step(model, loss_fn, torch.randn(4, 3, 16, 16), torch.randint(1, 100, (4, 8)), micro_batch=0)


def test_synthetic_is_reproducible_and_heldout_is_unseen():
    a, b, c = D.SyntheticShapes(3), D.SyntheticShapes(3), D.SyntheticShapes(4)
    for i in (0, 5, 123):
        (ia, ca), (ib, cb) = a[i], b[i]
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and ca == cb
    assert any(not np.array_equal(np.asarray(a[i][0]), np.asarray(c[i][0])) for i in range(4))
    held = D.SyntheticShapes(3, "heldout")
    unseen = {(col, shape, size) for (col, shape), size in a.heldout_size.items()}
    train = [a.describe(i) for i in range(600)]
    assert not {(d["colour"], d["shape"], d["size"]) for d in train} & unseen
    assert len({d["label"] for d in train}) == 24 and len({d["caption"] for d in train}) > 200
    for i in range(100):
        d = held.describe(i)
        assert (d["colour"], d["shape"], d["size"]) in unseen
        assert d["colour"] in d["caption"] and any(w in d["caption"] for w in D.SHAPES[d["shape"]])
    assert len(held.classnames) == 24
    with pytest.raises(ValueError, match="split"):
        D.SyntheticShapes(0, "test")


def _loader(source, batch, **kw):
    import fastclip

    return D.Loader(source, batch, transform=fastclip.image_transform(16), tokenizer=D.CachedTokenizer(12), **kw)


@pytest.mark.parametrize("world", [1, 2])
def test_loader_resumes_exactly_synthetic(world):
    src = D.SyntheticShapes(0, image_size=16)
    ref = _loader(src, 4, rank=world - 1, world_size=world)
    batches = [next(ref) for _ in range(5)]
    first = _loader(src, 4, rank=world - 1, world_size=world)
    for _ in range(2):
        next(first)
    resumed = _loader(src, 4, rank=world - 1, world_size=world)
    resumed.load_state_dict(first.state_dict())
    for want in batches[2:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _png(colour, size=20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path, items):
    """items: (key, {ext: bytes})"""
    with tarfile.open(path, "w") as tar:
        for key, files in items:
            for ext, data in files.items():
                _add(tar, f"{key}.{ext}", data)


def test_webdataset_round_trip_and_corrupt_samples(tmp_path):
    colours = [(10 * i, 255 - 10 * i, 7 * i) for i in range(10)]
    good = [(f"{s:01d}{i:04d}", {"png": _png(colours[5 * s + i]), "txt": f"colour {5 * s + i}".encode()})
            for s in range(2) for i in range(5)]
    _write_shard(tmp_path / "0.tar", good[:5] + [("0bad", {"png": b"not an image", "txt": b"x"}),
                                                 ("0notext", {"png": _png((1, 2, 3))})])
    _write_shard(tmp_path / "1.tar", good[5:])
    src = D.make_source(f"wds:{tmp_path}/{{0..1}}.tar", seed=0, image_size=16)
    loader = _loader(src, 12)
    images, tokens = next(loader)
    assert loader.skipped == 2 and (loader.epoch, loader.position) == (1, 2)
    import fastclip

    want = {tuple(fastclip.tokenize(f"colour {k}", 12)[0].tolist()): colours[k] for k in range(10)}
    tf = fastclip.image_transform(16)
    seen = 0
    for img, tok in zip(images, tokens):
        colour = want[tuple(tok.tolist())]
        assert torch.allclose(img, tf(Image.new("RGB", (20, 20), colour)), atol=1e-6)
        seen += 1
    assert seen == 12  # 10 good samples and 2 from the next epoch
    # resume mid-epoch: the same batches follow
    ref = _loader(src, 3)
    batches = [next(ref) for _ in range(6)]
    part = _loader(src, 3)
    next(part)
    next(part)
    again = _loader(src, 3)
    again.load_state_dict(part.state_dict())
    for want_b in batches[2:]:
        got = next(again)
        assert torch.equal(got[0], want_b[0]) and torch.equal(got[1], want_b[1])


def test_truncated_shard_is_skipped(tmp_path):
    _write_shard(tmp_path / "a.tar", [(f"k{i}", {"png": _png((i, i, i)), "txt": b"grey"}) for i in range(6)])
    raw = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(raw[:2600])  # cut inside k1.png's data (each member: 512 header + 512 data)
    loader = _loader(D.ShardSource(f"{tmp_path}/{{a,b}}.tar"), 8)
    images, _ = next(loader)
    assert images.shape[0] == 8 and loader.skipped == 1  # b.tar: k0, then one unreadable stretch


def test_missing_shard_and_empty_data_are_clear_errors(tmp_path):
    _write_shard(tmp_path / "0.tar", [("k", {"png": _png((0, 0, 0)), "txt": b"black"})])
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shard\(s\) not found: .*1\.tar"):
        D.make_source(f"wds:{tmp_path}/{{0..1}}.tar", seed=0, image_size=16)
    _write_shard(tmp_path / "empty.tar", [])
    loader = _loader(D.ShardSource(str(tmp_path / "empty.tar")), 2)
    with pytest.raises(ValueError, match="no samples"):
        next(loader)
    (tmp_path / "empty.csv").write_text("filepath,title\n")
    with pytest.raises(ValueError, match="no rows"):
        D.TableSource(str(tmp_path / "empty.csv"))
    (tmp_path / "cols.csv").write_text("path,caption\na.png,x\n")
    with pytest.raises(ValueError, match="no column"):
        D.TableSource(str(tmp_path / "cols.csv"))
    with pytest.raises(ValueError, match="--data"):
        D.make_source("images.zip", seed=0, image_size=16)


def test_csv_skips_and_counts_corrupt_rows(tmp_path):
    rows = []
    for i in range(6):
        (tmp_path / f"{i}.png").write_bytes(_png((40 * i, 0, 0)))
        rows.append(f"{i}.png\tred {i}")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG garbage")
    rows += ["junk.png\tjunk", "missing.png\tmissing"]
    (tmp_path / "d.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    loader = _loader(D.make_source(str(tmp_path / "d.tsv"), seed=0, image_size=16), 6, workers=2)
    images, tokens = next(loader)
    assert images.shape == (6, 3, 16, 16) and loader.skipped == 2 and loader.epoch == 0
    next(loader)  # the next batch comes from the next epoch, skipping the two again
    assert loader.epoch == 1 and loader.skipped == 4


def test_zero_shot_of_a_perfect_model():
    from fastclip.train.evaluate import zero_shot

    class Oracle(torch.nn.Module):  # image i -> one-hot of its label; the text "k" -> one-hot of k
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def encode_image(self, x, normalize=False):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 5).float()

        def encode_text(self, t, normalize=False):
            return torch.nn.functional.one_hot(t[:, 0], 5).float()

    labels = torch.tensor([0, 3, 4, 1, 1, 2])
    images = labels.float()[:, None, None, None].expand(6, 3, 2, 2)
    res = zero_shot(Oracle(), images, labels, ["0", "1", "2", "3", "4"], ["{}"],
                    lambda texts: torch.tensor([[int(t)] for t in texts]), batch_size=4)
    assert res["zeroshot_top1"] == 1.0 and res["zeroshot_top5"] == 1.0 and res["chance"] == 0.2
    res = zero_shot(Oracle(), images, (labels + 1) % 5, ["0", "1", "2", "3", "4"], ["{}"],
                    lambda texts: torch.tensor([[int(t)] for t in texts]))
    assert res["zeroshot_top1"] == 0.0


def test_schedule_and_weight_decay_groups():
    assert cosine_lr(0, steps=100, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(9, steps=100, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(10, steps=100, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(55, steps=100, warmup=10) == pytest.approx(0.5)
    model = CLIP(**MICRO, init_logit_bias=-10.0)
    no_decay, decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "logit_bias", "ln_final.weight", "ln_final.bias"} <= nd
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.2
    assert no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("argv, match", [
    ([], "--data is required"),
    (["--data", "synthetic"], "--out is required"),
    (["--data", "synthetic", "--out", "X", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--data", "synthetic", "--out", "X", "--micro-batch", "0"], "--micro-batch must be >= 1"),
    (["--data", "synthetic", "--out", "X", "--lr", "-1"], "--lr must be > 0"),
    (["--data", "synthetic", "--out", "X", "--grad-clip", "0"], "--grad-clip must be > 0"),
    (["--resume", "/nonexistent/run"], "no config.json"),
])
def test_bad_options_are_clear_errors(argv, match):
    with pytest.raises(ValueError, match=match):
        resolve(argv)


@pytest.mark.parametrize("extra, match", [
    (["--model", "ViT-Q-99"], "unknown"),
    (["--loss", "siglip", "--dist-impl", "local"], "--dist-impl 'local' with --loss siglip"),
    (["--data", "wds:/nonexistent/{0..3}.tar"], "4 of 4 shard"),
    (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
])
def test_bad_options_exit_2(tmp_path, capsys, extra, match):
    argv = ["--data", "synthetic", "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2"] + extra
    assert train_main(argv) == 2
    assert match in capsys.readouterr().err


def _cfg(tmp_path, *extra):
    return resolve(["--data", "synthetic", "--out", str(tmp_path / "run"), "--batch-size", "8", "--steps", "4",
                    "--log-every", "1", "--eval-samples", "24"] + list(extra))


@pytest.mark.slow
def test_train_smoke_writes_run(tmp_path, capsys):
    argv = ["--data", "synthetic", "--out", str(tmp_path / "run"), "--batch-size", "8", "--steps", "3", "--log-every",
            "2", "--eval-samples", "24", "--micro-batch", "3", "--loss", "siglip", "--grad-clip", "1.0"]
    assert train_main(argv) == 0
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]
    for key in ("loss", "lr", "logit_scale", "logit_bias", "samples_per_s", "peak_mem_mb", "elapsed_s"):
        assert math.isfinite(rows[-1][key]), key
    assert rows[-1]["chance"] == pytest.approx(1 / 24) and 0 <= rows[-1]["zeroshot_top1"] <= 1
    assert rows[0]["logit_scale"] == pytest.approx(10.0, rel=0.05)  # SigLIP's initialization
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["micro_batch"] == 3 and config["options"]["warmup"] == 1 and config["commit"]
    assert (run / "curves.png").stat().st_size > 0 and (run / "checkpoints" / "last.pt").is_file()
    model = CLIP(**TINY_MODELS["tiny"], init_logit_bias=0.0)
    load_checkpoint(model, run / "checkpoints" / "last.pt")  # a training checkpoint with open_clip's keys, strict
    assert "step 3/3" in capsys.readouterr().out
    assert train_main(argv) == 2  # the folder holds a run: not overwritten


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "--save-every", "2", "--steps", "6"))
    inner = trainer.loss_fn
    calls = []

    def poisoned(i, t, s, b):
        calls.append(1)
        loss = inner(i, t, s, b)
        return loss * float("nan") if len(calls) == 3 else loss

    trainer.loss_fn = poisoned
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3.*last\.pt \(step 2\)"):
        trainer.run()
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == 2
    assert all(torch.isfinite(v).all() for v in trainer.module.state_dict().values())


def test_logit_scale_is_clamped(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "--steps", "1"))
    with torch.no_grad():
        trainer.module.logit_scale.fill_(6.0)
    trainer.train_step(*next(trainer.loader))
    assert trainer.module.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE, rel=1e-7)


@pytest.mark.slow
def test_gradient_caching_memory_is_flat_in_batch_size():
    from fastclip.bench.common import cpu_peak_supported, peak_memory_mb

    if not cpu_peak_supported():
        pytest.skip("no /proc/self/clear_refs: the CPU peak memory cannot be measured here")
    cfg = dict(MICRO, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=4, head_width=32))
    model = CLIP(**cfg)
    loss_fn = build_loss("clip", None, 0, 1)

    def peak(n, micro):
        images, texts = torch.randn(n, 3, 32, 32), torch.randint(1, 100, (n, 8))

        def step():
            model.zero_grad(set_to_none=False)
            backward_step(model, loss_fn, images, texts, micro_batch=micro)

        step()
        return peak_memory_mb(step, torch.device("cpu"))

    full = peak(128, None) - peak(16, None)
    cached = peak(128, 8) - peak(16, 8)
    print(f"peak memory growth from N = 16 to 128: {full:.1f} MB whole batch, {cached:.1f} MB with M = 8")
    assert full > 20  # the towers' activations grow with the batch ...
    assert cached < 0.15 * full, (cached, full)  # ... but not with gradient caching at a fixed micro-batch


def test_image_folder_eval_set(tmp_path):
    import fastclip

    for name, colour in (("red_thing", (200, 0, 0)), ("blue_thing", (0, 0, 200))):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.png").write_bytes(_png(colour))
    (tmp_path / "red_thing" / "broken.jpg").write_bytes(b"not an image")
    images, labels, names = D.image_folder_set(str(tmp_path), fastclip.image_transform(16))
    assert names == ["blue thing", "red thing"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert images.shape == (6, 3, 16, 16)
    (tmp_path / "names.txt").write_text("a blue square\n")
    with pytest.raises(ValueError, match="1 names for 2 class folders"):
        D.image_folder_set(str(tmp_path), fastclip.image_transform(16), str(tmp_path / "names.txt"))
    with pytest.raises(FileNotFoundError, match="--eval-data"):
        D.image_folder_set(str(tmp_path / "nope"), fastclip.image_transform(16))


@pytest.mark.slow
def test_bench_train_runs_every_provider(tmp_path):
    from fastclip.bench import train as bench

    csv = str(tmp_path / "train.csv")
    rows = bench.run(Namespace(device="cpu", model="tiny", batch=[4, 8], micro_batch=4, provider=None,
                               memory_budget_mb=None, rep=1, csv=csv, out=None, save=False))
    assert [r.provider for r in rows] == [p for p in bench.PROVIDERS for _ in (4, 8)]
    assert all(math.isfinite(r.ms_p50) and r.ms_p50 > 0 for r in rows)
    assert [r.mode for r in rows if r.provider == "open_clip-accum"] == ["accum=1", "accum=2"]
    assert os.path.getsize(csv) > 0 and (tmp_path / "train.png").stat().st_size > 0
    assert bench.max_batches(rows, float("inf")) == {p: 8 for p in bench.PROVIDERS}
    assert bench.max_batches(rows, -1.0) == {p: 0 for p in bench.PROVIDERS}
