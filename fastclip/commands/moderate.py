"""``fastclip moderate <folder> --policy policy.toml``: flag images that match policy categories.

A policy names categories, each described by several prompts, with a threshold on the cosine similarity::

    [[category]]
    name = "weapons"
    prompts = ["a photo of a gun", "a photo of a rifle", "a person holding a knife"]
    threshold = 0.27                       # or calibrate it from labelled examples:
    # positives = ["examples/gun1.jpg"]    # images that must be flagged (paths relative to the policy file)
    # negatives = ["examples/toy.jpg"]     # images that must not

An image's score for a category is its largest cosine similarity with the category's prompts; it is flagged when
the score reaches the threshold, and the report says which prompt matched. Calibration (``positives`` and/or
``negatives`` instead of ``threshold``) picks the threshold t that maximizes TPR - FPR on the examples (flag iff
score >= t), midway between neighbouring example scores, the higher one on ties (fewer false flags); positives only:
the lowest positive score; negatives only: just above the highest negative score.

Writes ``<out>/moderation.csv`` (one row per image and category: score, threshold, flagged, best prompt) and
``<out>/summary.txt`` (flagged files and why), and prints the summary.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tomllib
from typing import List, Optional, Sequence

import torch

from fastclip.commands.common import add_model_args, embed_images, embed_texts, load_model, model_spec


def calibrate(pos: Sequence[float], neg: Sequence[float]) -> float:
    """The threshold t maximizing TPR - FPR for "flag iff score >= t" (see the module's docstring)."""
    if not pos and not neg:
        raise ValueError("calibration needs at least one example")
    if not neg:
        return min(pos)
    if not pos:
        return math.nextafter(max(neg), math.inf)
    values = sorted(set(pos) | set(neg))
    candidates = [values[0]] + [(a + b) / 2 for a, b in zip(values, values[1:])] + \
        [math.nextafter(values[-1], math.inf)]
    best, best_t = None, candidates[0]
    for t in candidates:
        # TPR - FPR times len(pos) * len(neg): integers, so ties are exact
        j = sum(s >= t for s in pos) * len(neg) - sum(s >= t for s in neg) * len(pos)
        if best is None or j >= best:  # >=: the higher threshold on ties
            best, best_t = j, t
    return best_t


def read_policy(path: str) -> List[dict]:
    with open(path, "rb") as f:
        policy = tomllib.load(f)
    cats = policy.get("category")
    if not isinstance(cats, list) or not cats:
        raise SystemExit(f"{path}: no [[category]] tables")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for n, c in enumerate(cats):
        name = c.get("name") or f"category {n + 1}"
        prompts = c.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(s, str) and s for s in prompts):
            raise SystemExit(f"{path}: {name}: 'prompts' must be a non-empty list of strings")
        examples = {k: [os.path.join(base, e) for e in c.get(k, [])] for k in ("positives", "negatives")}
        has_examples = bool(examples["positives"] or examples["negatives"])
        if ("threshold" in c) == has_examples:
            raise SystemExit(f"{path}: {name}: give either 'threshold' or calibration examples "
                             f"('positives'/'negatives'), one of the two")
        out.append({"name": name, "prompts": prompts, "threshold": c.get("threshold"), **examples})
    return out


def _category_scores(feats: torch.Tensor, prompts: torch.Tensor):
    """(max cosine over the prompts, argmax prompt) per image."""
    if feats.shape[0] == 0:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return (feats @ prompts.T).max(dim=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip moderate", description="Flag images matching policy categories.")
    p.add_argument("folder")
    p.add_argument("--policy", required=True, help="TOML policy (see fastclip.commands.moderate)")
    p.add_argument("--out", default="moderation", help="report folder (moderation.csv, summary.txt)")
    add_model_args(p)
    args = p.parse_args(argv)
    from fastclip.zeroshot import list_images

    cats = read_policy(args.policy)
    spec = model_spec(args)
    if spec is None:
        raise SystemExit("give a model: --model NAME --pretrained FILE, or --run DIR")
    model, tokenizer, preprocess = load_model(spec, args.device)
    for c in cats:
        c["emb"] = embed_texts(model, tokenizer, c["prompts"], args.device)
        if c["threshold"] is None:
            scores = {}
            for kind in ("positives", "negatives"):
                feats, _, bad = embed_images(model, preprocess, c[kind], args.device, args.batch_size)
                if bad:
                    raise SystemExit(f"{c['name']}: unreadable calibration example {bad[0][0]}: {bad[0][1]}")
                scores[kind] = _category_scores(feats, c["emb"])[0].tolist()
            c["threshold"] = calibrate(scores["positives"], scores["negatives"])
            c["how"] = f"calibrated on {len(scores['positives'])} positive and {len(scores['negatives'])} negative " \
                       f"examples"
        else:
            c["how"] = "from the policy"
    paths = list_images(args.folder)
    feats, ok, skipped = embed_images(model, preprocess, paths, args.device, args.batch_size, progress=True)
    os.makedirs(args.out, exist_ok=True)
    flagged = {}
    with open(os.path.join(args.out, "moderation.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", "score", "threshold", "flagged", "best_prompt"])
        for c in cats:
            score, which = _category_scores(feats, c["emb"])
            for path, s, i in zip(ok, score.tolist(), which.tolist()):
                hit = s >= c["threshold"]
                w.writerow([path, c["name"], f"{s:.5f}", f"{c['threshold']:.5f}", int(hit), c["prompts"][i]])
                if hit:
                    flagged.setdefault(path, []).append(f"{c['name']} ({s:.3f} >= {c['threshold']:.3f}, "
                                                        f"closest prompt: {c['prompts'][i]!r})")
    lines = [f"{len(ok)} images checked, {len(flagged)} flagged, {len(skipped)} unreadable (skipped)", "",
             "thresholds:"]
    lines += [f"  {c['name']}: {c['threshold']:.4f} ({c['how']})" for c in cats]
    lines += ["", "flagged:"] + [f"  {path}: " + "; ".join(why) for path, why in flagged.items()]
    lines += [f"  (none)"] if not flagged else []
    lines += ["", "unreadable:"] + [f"  {path}: {why}" for path, why in skipped] if skipped else []
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(summary)
    sys.stdout.write(summary)
    print(f"report: {os.path.join(args.out, 'moderation.csv')}, {os.path.join(args.out, 'summary.txt')}")
    return 0
