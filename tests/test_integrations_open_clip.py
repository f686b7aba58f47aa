"""fastclip inside open_clip: exact loss signatures, create_loss patched, attention replaced, open_clip_train itself.

The training runs are open_clip_train's own program (tests/open_clip_train_run.py) on its synthetic dataset with a
few random classes, a tiny model, fp32 on the CPU: stock against ``python -m fastclip.integrations.open_clip_train``,
per-step losses within 1e-5.
"""
import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastclip
from fastclip.integrations import open_clip as fc_open_clip
from fastclip.integrations.open_clip_train import split_args

open_clip = pytest.importorskip("open_clip")
from open_clip import loss as oc_loss  # noqa: E402

from .helpers import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VISION = dict(image_size=32, layers=2, width=64, head_width=16, patch_size=8)
TEXT = dict(context_length=16, vocab_size=1000, width=64, heads=4, layers=2)


# ---------------------------------------------------------------------------------------------------------------
# Signatures


def _described(params):
    return [(p.name, p.default, p.kind) for p in params]


@pytest.mark.parametrize("ours,theirs", [(fastclip.ContrastiveLoss, oc_loss.ClipLoss),
                                         (fastclip.SigLIPLoss, oc_loss.SigLipLoss)])
def test_loss_signatures_are_open_clips(ours, theirs):
    """open_clip's arguments in open_clip's order with its defaults; fastclip's extras keyword-only after them."""
    mine = list(inspect.signature(ours).parameters.values())
    theirs_params = list(inspect.signature(theirs).parameters.values())
    assert _described(mine[:len(theirs_params)]) == _described(theirs_params)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in mine[len(theirs_params):])
    fwd = list(inspect.signature(ours.forward).parameters.values())
    assert _described(fwd) == _described(inspect.signature(theirs.forward).parameters.values())


def test_horovod_refused():
    assert fastclip.ContrastiveLoss(False, False, True, 0, 1, False).world_size == 1
    with pytest.raises(ValueError, match="use_horovod=True.*torch.distributed"):
        fastclip.ContrastiveLoss(use_horovod=True)


# ---------------------------------------------------------------------------------------------------------------
# patch(): open_clip's create_loss builds fastclip's losses


def _train_args(**kw):
    args = dict(distill=False, model="ViT-B-32", siglip=False, horovod=False, local_loss=False,
                gather_with_grad=False, rank=0, world_size=1, loss_dist_impl=None,
                coca_caption_loss_weight=2.0, coca_contrastive_loss_weight=1.0)
    return argparse.Namespace(**{**args, **kw})


def test_patch_create_loss():
    stock = open_clip.create_loss(_train_args())
    assert type(stock) is oc_loss.ClipLoss
    with fc_open_clip.patch(backend="torch") as patched:
        loss = open_clip.create_loss(_train_args(local_loss=True, gather_with_grad=True))
        assert type(loss) is fastclip.ContrastiveLoss and loss.local_loss and loss.gather_with_grad
        assert loss.backend == "torch" and loss.dist_impl is None
        siglip = open_clip.create_loss(_train_args(siglip=True, loss_dist_impl="shift"))
        assert type(siglip) is fastclip.SigLIPLoss and siglip.dist_impl == "shift"
        assert type(open_clip.create_loss(_train_args(model="coca_ViT-B-32"))) is oc_loss.CoCaLoss
        with pytest.raises(RuntimeError, match="already patched"):
            fc_open_clip.patch()
        assert patched is not None
    assert type(open_clip.create_loss(_train_args())) is oc_loss.ClipLoss
    fc_open_clip.patch(dist_impl="ring")
    try:
        assert open_clip.create_loss(_train_args()).dist_impl == "ring"
        assert open_clip.create_loss(_train_args(siglip=True, loss_dist_impl="shift")).dist_impl == "ring"
    finally:
        fc_open_clip.unpatch()
    assert type(open_clip.create_loss(_train_args(siglip=True))) is oc_loss.SigLipLoss
    fc_open_clip.unpatch()  # nothing to undo: no error


def test_patched_loss_matches_open_clip():
    """The loss create_loss builds when patched: open_clip's value and gradients."""
    img, txt = (torch.nn.functional.normalize(torch.randn(9, 16, dtype=torch.float64), dim=-1).requires_grad_()
                for _ in range(2))
    scale = torch.tensor(30.0, dtype=torch.float64, requires_grad=True)
    for kind in (dict(), dict(siglip=True)):
        bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True) if kind else None
        leaves = [img, txt, scale] + ([bias] if kind else [])
        expect = open_clip.create_loss(_train_args(**kind))(img, txt, scale, bias, output_dict=True)
        with fc_open_clip.patch():
            got = open_clip.create_loss(_train_args(**kind))(img, txt, scale, bias, output_dict=True)
        (value, ref), = zip(got.values(), expect.values())
        assert list(got) == list(expect)
        assert_close("loss", value.detach(), ref.detach(), rtol=1e-12, atol=1e-12)
        for g, r in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(ref, leaves)):
            assert_close("grad", g, r, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# replace_attention: any open_clip model, keys unchanged, same outputs


def _models():
    yield "CLIP", open_clip.CLIP(32, VISION, TEXT)
    yield "CustomTextCLIP+cls", open_clip.CustomTextCLIP(32, VISION, dict(TEXT, embed_cls=True))  # 3-D masks
    yield "CoCa", open_clip.CoCa(64, dict(TEXT, attn_pooler_heads=4),
                                 dict(TEXT, embed_cls=True, output_tokens=True),
                                 dict(VISION, attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=8,
                                      output_tokens=True))


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_replace_attention(name, model):
    model = model.double()
    with torch.no_grad():  # non-zero biases everywhere, so that a wrong bias path shows
        for key, p in model.named_parameters():
            if key.endswith("bias"):
                p.normal_(0, 0.1)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    text = torch.randint(1, TEXT["vocab_size"], (3, TEXT["context_length"]))
    text[:, -3:] = 0  # padding tokens, for the towers that mask them
    keys = list(model.state_dict())
    params = list(model.parameters())

    def run():
        out = model(images, text)
        out = out if isinstance(out, dict) else dict(zip(("image_features", "text_features"), out))
        feats = [out["image_features"], out["text_features"]] + ([out["logits"]] if "logits" in out else [])
        grads = torch.autograd.grad(sum(f.square().sum() for f in feats), params, allow_unused=True)
        return [f.detach() for f in feats], grads

    expect, expect_grads = run()
    n_torch = sum(type(m) is torch.nn.MultiheadAttention for m in model.modules())
    replaced = fc_open_clip.replace_attention(model, backend="torch")
    assert len(replaced) == n_torch > 0
    assert not any(type(m) is torch.nn.MultiheadAttention for m in model.modules())
    assert list(model.state_dict()) == keys and all(a is b for a, b in zip(model.parameters(), params))
    got, grads = run()
    for g, e in zip(got, expect):
        assert_close(name, g, e, rtol=1e-10, atol=1e-10)
    for g, e in zip(grads, expect_grads):
        assert (g is None) == (e is None)
        if g is not None:
            assert_close(f"{name} grad", g, e, rtol=1e-9, atol=1e-10)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_patch_attention_replaces_in_created_models(tmp_path):
    config = tmp_path / "fastclip-tiny-test.json"
    config.write_text(json.dumps(dict(embed_dim=32, vision_cfg=VISION, text_cfg=TEXT)))
    open_clip.add_model_config(config)
    try:
        with fc_open_clip.patch(attention=True):
            model, _, _ = open_clip.create_model_and_transforms("fastclip-tiny-test")
            direct = open_clip.create_model("fastclip-tiny-test")
        stock = open_clip.create_model("fastclip-tiny-test")
    finally:  # leave open_clip's registry as it was (other tests walk open_clip.list_models())
        open_clip.factory._MODEL_CONFIGS.pop("fastclip-tiny-test", None)
    for m in (model, direct):
        assert any(isinstance(x, fastclip.nn.MultiheadAttention) for x in m.modules())
        assert not any(type(x) is torch.nn.MultiheadAttention for x in m.modules())
    assert not any(isinstance(x, fastclip.nn.MultiheadAttention) for x in stock.modules())
    with pytest.raises(TypeError, match="TorchScript"):
        fc_open_clip.replace_attention(torch.jit.script(torch.nn.Linear(2, 2)))


def test_launcher_splits_arguments():
    opts, rest = split_args(["--model", "ViT-B-32", "--fastclip-loss-impl", "ring", "--siglip",
                             "--no-fastclip-attention", "--batch-size", "8"])
    assert rest == ["--model", "ViT-B-32", "--siglip", "--batch-size", "8"]
    assert opts.fastclip_loss_impl == "ring" and not opts.fastclip_attention and opts.fastclip_backend == "auto"


# ---------------------------------------------------------------------------------------------------------------
# open_clip_train itself


def _train(tmp_path, procs, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    script = str(ROOT / "tests" / "open_clip_train_run.py")
    if procs == 1:
        cmd = [sys.executable, script, str(tmp_path), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               script, str(tmp_path), *extra]
    done = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((tmp_path / f"losses-{r}.json").read_text()) for r in range(procs)]


def _check_runs(per_rank, runs):
    for results in per_rank:
        for kind, loss_class in (("clip", "ContrastiveLoss"), ("siglip", "SigLIPLoss")):
            stock = torch.tensor(results[f"{kind}-stock"]["losses"], dtype=torch.float64)
            assert len(stock) >= 4 and (stock[0] - stock[1:]).abs().max() > 0.05, f"{kind}: the loss does not move"
            assert results[f"{kind}-stock"]["fused_calls"] == 0
            for run in runs:
                r = results[f"{kind}-{run}"]
                assert r["loss_class"] == loss_class and r["fused_calls"] >= 4 * len(stock)  # 4 attention layers
                diff = (torch.tensor(r["losses"], dtype=torch.float64) - stock).abs().max().item()
                assert diff < 1e-5, f"{kind}-{run}: per-step losses {r['losses']} vs stock {stock.tolist()}"


def test_open_clip_train_one_process(tmp_path):
    _check_runs(_train(tmp_path, 1, "--steps", "4"), ["fastclip"])


@pytest.mark.slow
def test_open_clip_train_two_processes(tmp_path):
    _check_runs(_train(tmp_path, 2, "--steps", "4", "--ring"), ["fastclip", "fastclip-ring"])
