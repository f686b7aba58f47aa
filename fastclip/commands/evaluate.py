"""``fastclip eval zeroshot --data <image folder>`` and ``fastclip eval retrieval --data <captions.csv>``.

zeroshot: top-1 / top-5 accuracy on ``data/<class>/<image>`` (class names: the folder names, or a shipped list
with ``--classnames imagenet1k|cifar10|cifar100`` or a file), prompts from OpenAI's 80 templates by default.
retrieval: CLIP_benchmark's image and text recall@k on a CSV/TSV with ``filepath`` and ``caption`` columns.
Prints a table, and the metrics as JSON (to ``--json FILE`` when given).
"""
from __future__ import annotations

import argparse
import json

from fastclip.commands.common import add_model_args, add_template_args, load_model, model_spec, read_lines, \
    templates_from


def _classnames(arg):
    from fastclip import zeroshot

    shipped = {"imagenet1k": zeroshot.IMAGENET_CLASSNAMES, "cifar10": zeroshot.CIFAR10_CLASSNAMES,
               "cifar100": zeroshot.CIFAR100_CLASSNAMES}
    if arg is None:
        return None
    return list(shipped[arg]) if arg in shipped else read_lines(arg)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip eval", description="Zero-shot classification or retrieval metrics.")
    p.add_argument("task", choices=("zeroshot", "retrieval"))
    p.add_argument("--data", required=True, help="zeroshot: image folder data/<class>/<image>; retrieval: CSV/TSV "
                                                 "with filepath and caption columns")
    p.add_argument("--classnames", help="zeroshot: imagenet1k, cifar10, cifar100 or a file with one name per line "
                                        "(in sorted class-folder order; default: the folder names)")
    p.add_argument("--ks", default="1,5,10", help="retrieval: the k's of recall@k")
    p.add_argument("--json", help="write the metrics to this JSON file")
    add_template_args(p)
    add_model_args(p)
    args = p.parse_args(argv)
    spec = model_spec(args)
    if spec is None:
        raise SystemExit("give a model: --model NAME --pretrained FILE, or --run DIR")
    model, tokenizer, preprocess = load_model(spec, args.device)
    if args.task == "zeroshot":
        from fastclip.zeroshot import evaluate_zero_shot

        metrics = evaluate_zero_shot(model, tokenizer, preprocess, args.data, classnames=_classnames(args.classnames),
                                     templates=templates_from(args), batch_size=args.batch_size, device=args.device)
    else:
        from fastclip.retrieval import evaluate_retrieval

        ks = [int(k) for k in args.ks.split(",")]
        metrics = evaluate_retrieval(model, tokenizer, preprocess, args.data, ks=ks, batch_size=args.batch_size,
                                     device=args.device)
    width = max(map(len, metrics))
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    text = json.dumps({"task": args.task, "data": args.data, "model": spec, "metrics": metrics}, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0
