"""``fastclip classify <images...> --labels "cat,dog,car"``: zero-shot labels with probabilities.

Each label's embedding is built as open_clip's zero-shot classifier builds it (the normalized mean of the
normalized embeddings of its prompts, one per template); probabilities are softmax(logit_scale * cosine) over the
labels, with the model's own (exp'd) logit_scale, as CLIP's zero-shot evaluation; for a SigLIP model (one with a
logit_bias) each label's probability is sigmoid(logit_scale * cosine + logit_bias), independently of the others.
"""
from __future__ import annotations

import argparse
import json

import torch

from fastclip.commands.common import (add_model_args, add_template_args, embed_images, load_model, model_spec,
                                      read_lines, split_labels, templates_from)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip classify", description="Zero-shot classification of images against "
                                "labels, with prompt templates.")
    p.add_argument("images", nargs="+")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--labels", help="comma-separated labels")
    g.add_argument("--labels-file", help="one label per line")
    p.add_argument("--top", type=int, default=3, help="labels shown per image")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    add_template_args(p)
    add_model_args(p)
    args = p.parse_args(argv)
    labels = split_labels(args.labels) if args.labels else read_lines(args.labels_file)
    if len(labels) < 1:
        raise SystemExit("no labels given")
    templates = templates_from(args)
    spec = model_spec(args)
    if spec is None:
        raise SystemExit("give a model: --model NAME --pretrained FILE, or --run DIR")
    model, tokenizer, preprocess = load_model(spec, args.device)
    from fastclip.zeroshot import build_zero_shot_classifier

    classifier = build_zero_shot_classifier(model, tokenizer, labels, templates, device=args.device).float()
    feats, ok, skipped = embed_images(model, preprocess, args.images, args.device, args.batch_size)
    with torch.no_grad():
        logits = model.logit_scale.exp().float() * feats @ classifier  # (n, labels)
        bias = getattr(model, "logit_bias", None)
        probs = (logits + bias.float()).sigmoid() if bias is not None else logits.softmax(dim=-1)
    top = min(args.top, len(labels))
    p_top, i_top = probs.topk(top, dim=-1)
    results = [{"path": path, "labels": [{"label": labels[i], "prob": float(pr)}
                                         for pr, i in zip(p_top[n].tolist(), i_top[n].tolist())]}
               for n, path in enumerate(ok)]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(r["path"] + ":  " + ",  ".join(f"{x['label']} {x['prob']:.1%}" for x in r["labels"]))
    for path, why in skipped:
        print(f"skipped {path}: {why}")
    return 0 if ok else 1
