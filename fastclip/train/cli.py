"""``fastclip train``: train CLIP or SigLIP end to end.

    fastclip train --data synthetic --model tiny --batch-size 256 --steps 300 --out runs/demo
    fastclip train --data "wds:/data/shards/{00000..00099}.tar" --model ViT-B-32 --batch-size 32768 \\
                   --micro-batch 512 --precision bf16 --loss siglip --out runs/b32   # under torchrun
    fastclip train --resume runs/b32                 # continue a killed run exactly (options from its config.json)
    fastclip train --plot runs/b32                   # redraw runs/b32/curves.png

With ``--resume DIR`` the run's saved options apply, and options given on the command line override them
(``--steps`` to train longer, say).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULTS = dict(
    data=None, model="tiny", pretrained=None, batch_size=256, micro_batch=None, steps=300, lr=5e-4, wd=0.2,
    beta1=0.9, beta2=0.98, eps=1e-6, warmup=None, grad_clip=None, precision="auto", loss="clip", dist_impl=None,
    compile=False, grad_checkpointing=False, attn="fastclip", seed=0, log_every=10, save_every=0, eval_every=0,
    eval_samples=600, eval_data=None, eval_classnames=None, workers=0, csv_img_key="filepath",
    csv_caption_key="title", csv_separator=None, out=None, resume=None, device="auto",
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclip train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1],
                                argument_default=argparse.SUPPRESS)
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'synthetic', 'wds:PATTERN' (webdataset shards, img2dataset layout) or a .csv/.tsv")
    g.add_argument("--csv-img-key", help=f"image path column (default {d['csv_img_key']})")
    g.add_argument("--csv-caption-key", help=f"caption column (default {d['csv_caption_key']})")
    g.add_argument("--csv-separator", help="column separator (default: tab for .tsv, comma otherwise)")
    g.add_argument("--workers", type=int, help="threads decoding images (default 0: in the training thread)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="'tiny' (a ViT), 'tiny-rn' (a ResNet) or a name of fastclip.list_models() "
                                    "(default tiny)")
    g.add_argument("--pretrained", help="checkpoint file to start from")
    g.add_argument("--attn", choices=("fastclip", "sdpa"), help="attention: fastclip.flash_attention (default) or "
                                                                 "PyTorch's SDPA")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, help=f"global batch size (default {d['batch_size']})")
    g.add_argument("--micro-batch", type=int, help="gradient caching: run the towers this many samples at a time "
                                                   "(per process); the step's gradients equal the full batch's")
    g.add_argument("--steps", type=int, help=f"optimizer steps (default {d['steps']})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    g.add_argument("--wd", type=float, help=f"AdamW weight decay, not on gains/biases/logit scale ({d['wd']})")
    g.add_argument("--beta1", type=float)
    g.add_argument("--beta2", type=float)
    g.add_argument("--eps", type=float)
    g.add_argument("--warmup", type=int, help="linear warm-up steps, then cosine decay (default: 10%% of --steps)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value (default: off)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype (auto: bf16 on a GPU, fp32 on the CPU)")
    g.add_argument("--loss", choices=("clip", "siglip"), help="contrastive (default) or sigmoid loss")
    g.add_argument("--dist-impl", help="the loss's distributed mode: clip gather (default), local, ring; siglip "
                                       "bidir (default), shift, reduce, gather, ring")
    g.add_argument("--seed", type=int, help="seed of the weights, the data order and the synthetic data")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder: checkpoints/, metrics.jsonl, curves.png, config.json")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--log-every", type=int, help=f"log every K steps (default {d['log_every']})")
    g.add_argument("--save-every", type=int, help="checkpoint every K steps (checkpoints/step_K.pt and last.pt; "
                                                  "default 0: last.pt at the end only)")
    g.add_argument("--eval-every", type=int, help="zero-shot evaluation every K steps (always at the end)")
    g.add_argument("--eval-samples", type=int, help=f"evaluation images (default {d['eval_samples']})")
    g.add_argument("--eval-data", help="'synthetic' (held-out split; the default with --data synthetic) or an "
                                       "image folder root/<class>/<image>")
    g.add_argument("--eval-classnames", help="file with one class name per line (sorted folder order)")
    g.add_argument("--plot", metavar="DIR", help="only redraw DIR/curves.png from DIR/metrics.jsonl")
    return p


def resolve(argv) -> dict:
    """Defaults, then the resumed run's saved options, then the options given; checked. Raises ValueError."""
    given = vars(parser().parse_args(argv))
    cfg = dict(DEFAULTS)
    if given.get("resume"):
        path = os.path.join(given["resume"], "config.json")
        if not os.path.isfile(path):
            raise ValueError(f"--resume {given['resume']!r}: no config.json there (not a fastclip train run folder)")
        with open(path) as f:
            cfg.update(json.load(f)["options"])
        cfg["out"] = given["resume"]
    cfg.update(given)
    if cfg["resume"] and os.path.abspath(cfg["out"]) != os.path.abspath(cfg["resume"]):
        raise ValueError(f"--resume {cfg['resume']!r} with --out {cfg['out']!r}: a run continues in its own folder")
    if not cfg["data"]:
        raise ValueError("--data is required ('synthetic', 'wds:PATTERN' or a .csv/.tsv)")
    if not cfg["out"]:
        raise ValueError("--out is required (the run folder)")
    for key in ("batch_size", "steps", "log_every"):
        if cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("save_every", "eval_every", "workers", "eval_samples"):
        if cfg[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {cfg[key]}")
    if cfg["micro_batch"] is not None and cfg["micro_batch"] < 1:
        raise ValueError(f"--micro-batch must be >= 1, got {cfg['micro_batch']}")
    if cfg["warmup"] is None:
        cfg["warmup"] = max(1, cfg["steps"] // 10)
    if cfg["warmup"] < 1:
        raise ValueError(f"--warmup must be >= 1, got {cfg['warmup']}")
    if cfg["lr"] <= 0 or cfg["wd"] < 0:
        raise ValueError(f"--lr must be > 0 and --wd >= 0, got lr={cfg['lr']}, wd={cfg['wd']}")
    if cfg["grad_clip"] is not None and cfg["grad_clip"] <= 0:
        raise ValueError(f"--grad-clip must be > 0, got {cfg['grad_clip']}")
    if not cfg["resume"] and os.path.isfile(os.path.join(cfg["out"], "checkpoints", "last.pt")):
        raise ValueError(f"--out {cfg['out']!r} already holds a run: continue it with --resume {cfg['out']}, or "
                         f"choose another folder")
    return cfg


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--plot" in argv:
        from fastclip.train.plot import plot_run

        ns = parser().parse_args(argv)
        print(plot_run(ns.plot))
        return 0
    try:
        cfg = resolve(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"fastclip train: error: {e}", file=sys.stderr)
        return 2
    from fastclip.train.loop import NonFiniteLossError, Trainer

    try:
        record = Trainer(cfg).run()
    except NonFiniteLossError as e:
        print(f"fastclip train: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad data or options found while setting up
        print(f"fastclip train: error: {e}", file=sys.stderr)
        return 2
    if record and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {cfg['out']} (checkpoints/last.pt, metrics.jsonl, curves.png, config.json)")
    return 0


__all__ = ["main", "resolve", "parser", "DEFAULTS"]
