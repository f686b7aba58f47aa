"""``fastclip index <folder> --out <index>`` and ``fastclip search <index> "text" --top 10``.

An index is a folder:

    meta.json          {"format": 1, "root": <folder>, "model": <model options>, "dim": E}
    shards/NNNNNN.npy  (n, E) float32 normalized image embeddings, one shard per --shard-size images
    shards/NNNNNN.txt  the n image paths, in the same order (relative to root)
    skipped.txt        unreadable files and why (tab-separated)

Each shard is written whole (temporary file, then rename; the .npy last), so an interrupted run leaves complete
shards only, and running the same command again embeds just the images not in a shard yet. Search loads every shard
and ranks with :func:`fastclip.topk_similarity`; the score is the cosine similarity.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Tuple

import numpy as np
import torch

from fastclip.commands.common import add_model_args, embed_images, embed_texts, load_model, model_spec, read_image

FORMAT = 1


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_index(index: str) -> Tuple[dict, torch.Tensor, List[str]]:
    """(meta, embeddings (N, E) float32, absolute paths (N))."""
    meta_path = os.path.join(index, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"{index}: not a fastclip index (no meta.json); build one with fastclip index")
    with open(meta_path) as f:
        meta = json.load(f)
    shard_dir = os.path.join(index, "shards")
    feats, paths = [], []
    for name in sorted(os.listdir(shard_dir)) if os.path.isdir(shard_dir) else []:
        if not name.endswith(".npy"):
            continue
        with open(os.path.join(shard_dir, name[:-4] + ".txt"), encoding="utf-8") as f:
            rel = f.read().splitlines()
        arr = np.load(os.path.join(shard_dir, name))
        if arr.shape != (len(rel), meta["dim"]):
            raise SystemExit(f"{index}: shard {name} holds {arr.shape} embeddings for {len(rel)} paths")
        feats.append(torch.from_numpy(arr))
        paths.extend(os.path.join(meta["root"], r) for r in rel)
    emb = torch.cat(feats) if feats else torch.empty(0, meta["dim"])
    return meta, emb, paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip index", description="Embed every image under a folder (recursively) "
                                "into an index for fastclip search. Resumable: rerun to continue.")
    p.add_argument("folder")
    p.add_argument("--out", required=True, help="index folder (created; an existing one is continued)")
    p.add_argument("--shard-size", type=int, default=4096, help="images per shard (the unit of resumption)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_model_args(p)
    args = p.parse_args(argv)
    from fastclip.zeroshot import list_images

    if not os.path.isdir(args.folder):
        raise SystemExit(f"{args.folder}: not a directory")
    root = os.path.abspath(args.folder)
    spec = model_spec(args)
    meta_path = os.path.join(args.out, "meta.json")
    if os.path.isfile(meta_path):
        meta, _, done_paths = load_index(args.out)
        if spec is not None and spec != meta["model"]:
            raise SystemExit(f"{args.out} was built with model {meta['model']}, not {spec}: use another --out")
        if meta["root"] != root:
            raise SystemExit(f"{args.out} indexes {meta['root']}, not {root}: use another --out")
        spec = meta["model"]
    else:
        if spec is None:
            raise SystemExit("give a model: --model NAME --pretrained FILE, or --run DIR")
        meta, done_paths = None, []
    model, _, preprocess = load_model(spec, args.device)
    if meta is None:
        dim = int(model.text_projection.shape[1])
        meta = {"format": FORMAT, "root": root, "model": spec, "dim": dim}
        os.makedirs(args.out, exist_ok=True)
        _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    shard_dir = os.path.join(args.out, "shards")
    os.makedirs(shard_dir, exist_ok=True)
    seen = set(done_paths)
    todo = [q for q in list_images(root) if q not in seen]
    n_shards = sum(name.endswith(".npy") for name in os.listdir(shard_dir))
    skipped = []
    print(f"{len(seen)} images already indexed, {len(todo)} to embed", file=sys.stderr)
    for s0 in range(0, len(todo), args.shard_size):
        emb, ok, bad = embed_images(model, preprocess, todo[s0:s0 + args.shard_size], args.device, args.batch_size,
                                    progress=not args.quiet)
        skipped.extend(bad)
        if ok:
            base = os.path.join(shard_dir, f"{n_shards:06d}")
            rel = "\n".join(os.path.relpath(q, root) for q in ok) + "\n"
            _atomic_write(base + ".txt", lambda f: f.write(rel.encode()))
            _atomic_write(base + ".npy", lambda f: np.save(f, emb.cpu().numpy().astype(np.float32)))
            n_shards += 1
    with open(os.path.join(args.out, "skipped.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{q}\t{why}\n" for q, why in skipped)
    total = len(seen) + len(todo) - len(skipped)
    print(f"indexed {total} images into {args.out}; skipped {len(skipped)} unreadable files"
          + (f" (see {os.path.join(args.out, 'skipped.txt')})" if skipped else ""))
    return 0


def contact_sheet(paths: List[str], scores: List[float], out: str, thumb: int = 160, cols: int = 5) -> None:
    """A grid of the hits' thumbnails, each captioned with its rank and score, saved to ``out``."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(paths) // cols))
    caption = 14
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (path, score) in enumerate(zip(paths, scores)):
        x, y = (r % cols) * thumb, (r // cols) * (thumb + caption)
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((thumb, thumb))
                sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
        except Exception:  # noqa: BLE001 - the file went away since indexing: leave its cell empty
            pass
        draw.text((x + 2, y + thumb), f"{r + 1}. {score:.3f} {os.path.basename(path)}"[:28], fill="black")
    sheet.save(out)


def search_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip search", description="Rank an index's images against a text (or an "
                                "image) query by cosine similarity.")
    p.add_argument("index")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="image query instead of text")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--sheet", help="write a contact sheet of the hits (PNG)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    add_model_args(p, required=False)
    args = p.parse_args(argv)
    if (args.query is None) == (args.image is None):
        raise SystemExit("give a text query or --image FILE (one of them)")
    meta, gallery, paths = load_index(args.index)
    if not paths:
        raise SystemExit(f"{args.index}: the index is empty")
    if args.top < 1:
        raise SystemExit("--top must be >= 1")
    model, tokenizer, preprocess = load_model(model_spec(args) or meta["model"], args.device)
    if args.image:
        with torch.no_grad():
            q = torch.nn.functional.normalize(
                model.encode_image(read_image(args.image, preprocess)[None].to(args.device)).float(), dim=-1)
    else:
        q = embed_texts(model, tokenizer, [args.query], args.device)
    if q.shape[1] != gallery.shape[1]:
        raise SystemExit(f"the model embeds in {q.shape[1]} dims, the index in {gallery.shape[1]}")
    import fastclip

    # on a GPU the host gallery is streamed to the device in chunks
    scores, idx = fastclip.topk_similarity(q, gallery, min(args.top, len(paths)))
    hits = [(paths[i], float(s)) for s, i in zip(scores[0].tolist(), idx[0].tolist())]
    if args.json:
        print(json.dumps([{"rank": r + 1, "score": s, "path": h} for r, (h, s) in enumerate(hits)], indent=1))
    else:
        for r, (h, s) in enumerate(hits):
            print(f"{r + 1:>4}  {s:.4f}  {h}")
    if args.sheet:
        contact_sheet([h for h, _ in hits], [s for _, s in hits], args.sheet)
        print(f"contact sheet: {args.sheet}", file=sys.stderr)
    return 0
