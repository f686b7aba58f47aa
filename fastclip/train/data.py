"""Training data: a synthetic dataset, webdataset shards and CSV/TSV files, read in batches that can resume.

Sources:

- ``synthetic``: :class:`SyntheticShapes`, images of a coloured shape drawn on the fly from ``(seed, split, index)``.
- ``wds:PATTERN`` (or a path ending in ``.tar``): webdataset shards in img2dataset's layout, one sample per key with
  an image (``jpg``/``jpeg``/``png``/``webp``) and a caption (``txt``); ``PATTERN`` may use braces
  (``/data/{00000..00099}.tar``).
- ``FILE.csv`` / ``FILE.tsv``: a table with an image path column and a caption column (open_clip's ``filepath`` and
  ``title`` by default); relative paths are relative to the table's folder.

Every source is read as a stream of raw samples per rank (rank r of W takes samples r, r + W, r + 2W, ... of a table
or of the synthetic index space, and shards r, r + W, ... of a shard list), in an order fixed by the seed and the
epoch. A sample that cannot be read or decoded is skipped and counted, and the batch is filled from the next ones.
The loader's state (epoch, raw samples consumed by this rank in the epoch, samples skipped) is all it needs to
continue exactly where it stopped.
"""
from __future__ import annotations

import csv
import functools
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

# -- the synthetic dataset -------------------------------------------------------------------------------------------

COLOURS = {"red": (215, 30, 30), "green": (30, 160, 50), "blue": (35, 70, 225), "yellow": (235, 210, 25),
           "purple": (135, 45, 180), "orange": (245, 135, 20)}
SHAPES = {"circle": ("circle", "round shape", "disc"), "square": ("square", "box", "square shape"),
          "triangle": ("triangle", "triangular shape"), "cross": ("cross", "plus sign")}
SIZES = {"small": 0.2, "medium": 0.28, "large": 0.38}  # half-width of the shape, as a fraction of the image side
BACKGROUNDS = {"white": (235, 235, 235), "light grey": (185, 185, 185), "grey": (128, 128, 128),
               "dark grey": (70, 70, 70), "black": (18, 18, 18), "beige": (225, 210, 180)}
TEMPLATES = ("a photo of a {size} {colour} {shape}.", "a {colour} {shape}.", "a {size} {colour} {shape} {where}.",
             "a {colour} {shape} on a {background} background.", "a drawing of a {colour} {shape}.",
             "{colour} {shape}, {size}.", "a picture of a {size} {colour} {shape} on a {background} background.",
             "there is a {colour} {shape} {where}.")
CLASS_TEMPLATES = ("a photo of a {}.", "a {}.", "a drawing of a {}.")
_SPLITS = {"train": 0, "heldout": 1}


class SyntheticShapes:
    """Images of one coloured shape on a varied background, with varied captions, reproducible from a seed.

    A sample is drawn from ``numpy.random.default_rng([seed, split, index])``: a class (colour, shape) out of
    ``len(COLOURS) * len(SHAPES)`` = 24, a size (small, medium, large), a position, a background grey level or tint
    with noise, a jitter of the shape's colour, and a caption from :data:`TEMPLATES` with synonyms for the shape
    ("a small red circle", "a red round shape on a black background", ...).

    Held-out split: for each class one size is held out (chosen from the seed). The train split never shows a class
    at its held-out size; the held-out split shows only those unseen (colour, shape, size) combinations. Zero-shot
    classification of the held-out split over the 24 class names ("red circle", ...) has chance level 1/24.
    """

    def __init__(self, seed: int = 0, split: str = "train", image_size: int = 32):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 to draw shapes, got {image_size}")
        self.seed, self.split, self.image_size = int(seed), split, int(image_size)
        self.classes = [(c, s) for c in COLOURS for s in SHAPES]
        self.classnames = [f"{c} {s}" for c, s in self.classes]
        sizes = list(SIZES)
        held = np.random.default_rng([self.seed, 7]).integers(len(sizes), size=len(self.classes))
        self.heldout_size = {cls: sizes[h] for cls, h in zip(self.classes, held)}

    def describe(self, index: int) -> dict:
        """The attributes of sample ``index``: colour, shape, size, centre, background, label, caption, rng."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], int(index)])
        label = int(rng.integers(len(self.classes)))
        colour, shape = self.classes[label]
        held = self.heldout_size[(colour, shape)]
        size = held if self.split == "heldout" else [s for s in SIZES if s != held][int(rng.integers(2))]
        n = self.image_size
        r = SIZES[size] * n
        cx, cy = rng.uniform(r + 1, n - r - 1, size=2)
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        third = "left" if cx < n / 3 else "right" if cx > 2 * n / 3 else None
        vert = "top" if cy < n / 3 else "bottom" if cy > 2 * n / 3 else None
        where = f"at the {vert or third}" if (vert or third) else "in the middle"
        caption = TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(
            size=size, colour=colour, shape=SHAPES[shape][int(rng.integers(len(SHAPES[shape])))],
            background=background, where=where)
        caption = re.sub(r"\b([aA]) (?=[aeiou])", r"\1n ", caption)  # "an orange ..."
        return dict(colour=colour, shape=shape, size=size, centre=(cx, cy), radius=r, background=background,
                    label=label, caption=caption, rng=rng)

    def __getitem__(self, index: int) -> Tuple[Image.Image, str]:
        d = self.describe(index)
        rng, n = d["rng"], self.image_size
        bg = np.asarray(BACKGROUNDS[d["background"]], np.float32) + rng.uniform(-15, 15, size=3)
        noise = rng.normal(0.0, rng.uniform(0, 12), size=(n, n, 3))
        img = Image.fromarray(np.clip(bg + noise, 0, 255).astype(np.uint8))
        fill = tuple(int(v) for v in np.clip(np.asarray(COLOURS[d["colour"]]) + rng.integers(-20, 21, size=3), 0, 255))
        (cx, cy), r = d["centre"], d["radius"]
        draw = ImageDraw.Draw(img)
        if d["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif d["shape"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif d["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:  # cross: two bars, each a third of the shape's width
            w = max(r / 3, 1.0)
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        return img, d["caption"]

    def label(self, index: int) -> int:
        return self.describe(index)["label"]


# -- file sources -----------------------------------------------------------------------------------------------------

class TableSource:
    """A CSV/TSV of (image path, caption) rows: random access, shuffled per epoch."""

    def __init__(self, path: str, img_key: str = "filepath", caption_key: str = "title",
                 separator: Optional[str] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--data: table {path!r} not found")
        sep = separator or ("\t" if path.lower().endswith(".tsv") else ",")
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            fields = reader.fieldnames or []
            missing = [k for k in (img_key, caption_key) if k not in fields]
            if missing:
                raise ValueError(f"--data: table {path!r} has no column(s) {missing} (columns: {fields}; set "
                                 f"--csv-img-key/--csv-caption-key, or --csv-separator)")
            rows = [(r[img_key], r[caption_key]) for r in reader]
        if not rows:
            raise ValueError(f"--data: table {path!r} has no rows")
        root = os.path.dirname(os.path.abspath(path))
        self.rows = [(p if os.path.isabs(p) else os.path.join(root, p), c) for p, c in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, i: int) -> Tuple[Image.Image, str]:
        path, caption = self.rows[i]
        with open(path, "rb") as f:
            return _decode_image(f.read()), caption


def expand_shards(pattern: str) -> List[str]:
    """Local shard paths of a brace pattern (``a/{000..009}.tar``, several patterns joined by ``::``); every one
    must exist."""
    import braceexpand

    shards = [s for p in pattern.split("::") for s in braceexpand.braceexpand(p)]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"--data: {len(missing)} of {len(shards)} shard(s) not found: "
                                f"{', '.join(missing[:3])}{more}")
    return shards


class ShardSource:
    """webdataset tar shards (img2dataset layout): a stream per rank over its shards, shard order shuffled per
    epoch. A sample without an image or a caption, or whose image does not decode, is skipped; so is the rest of a
    shard cut inside a member (counted once; a shard cut exactly between members reads as a shorter shard, since a
    tar stream has no index to tell)."""

    def __init__(self, pattern: str):
        self.shards = expand_shards(pattern)

    def stream(self, rank: int, world: int, epoch: int, seed: int) -> Iterator[Optional[dict]]:
        """Raw samples (dicts of bytes) of this rank's shards; None stands for an unreadable stretch of a shard."""
        from webdataset.tariterators import tarfile_samples

        mine = self.shards[rank::world]
        if not mine:
            raise ValueError(f"--data: {len(self.shards)} shard(s) for {world} processes: every process needs one")
        order = np.random.default_rng([seed, epoch, 11]).permutation(len(mine))
        errors: List[Exception] = []

        def handler(e: Exception) -> bool:
            errors.append(e)
            return False  # stop reading this shard: what follows a broken header cannot be trusted

        for k in order:
            for sample in tarfile_samples([{"url": mine[k]}], handler=handler):
                yield sample
            if errors:
                errors.clear()
                yield None


def _decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def _decode_shard_sample(sample: Optional[dict]) -> Tuple[Image.Image, str]:
    if sample is None:
        raise ValueError("unreadable shard data")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} lacks an image or a caption")
    return _decode_image(sample[ext]), sample["txt"].decode("utf-8")


class CachedTokenizer:
    """``fastclip.tokenize`` with a cache of recent captions (synthetic captions repeat; BPE is the slow part)."""

    def __init__(self, context_length: int, cache_size: int = 1 << 14):
        import fastclip

        self.context_length = context_length
        # ids as a tuple of ints: ~200 bytes a caption, where a tensor view would keep a numpy array alive
        self._one = functools.lru_cache(maxsize=cache_size)(
            lambda text: tuple(fastclip.tokenize(text, context_length=context_length)[0].tolist()))

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self._one(t) for t in texts], dtype=torch.int64)  # (n, context_length)


# -- the loader -------------------------------------------------------------------------------------------------------

def make_source(data: str, *, seed: int, image_size: int, img_key: str = "filepath", caption_key: str = "title",
                separator: Optional[str] = None):
    """The source named by ``--data``: "synthetic", "wds:PATTERN" or "*.tar"/brace pattern, "*.csv"/"*.tsv"."""
    if data == "synthetic":
        return SyntheticShapes(seed, "train", image_size)
    if data.startswith("wds:"):
        return ShardSource(data[4:])
    low = data.lower()
    if low.endswith((".csv", ".tsv")):
        return TableSource(data, img_key, caption_key, separator)
    if low.endswith(".tar") or low.endswith(".tar}") or "{" in data:
        return ShardSource(data)
    raise ValueError(f"--data {data!r}: expected 'synthetic', 'wds:PATTERN', a .tar shard pattern or a .csv/.tsv "
                     f"file")


class Loader:
    """Batches of (images (b, 3, H, W) float32, tokens (b, context_length) int64) for one rank, resumable.

    ``state_dict()`` = {"epoch", "position" (raw samples of this rank's stream consumed in the epoch),
    "skipped" (unreadable samples so far)}; ``load_state_dict`` continues from there, bit for bit.
    """

    def __init__(self, source, batch_size: int, *, transform: Callable,
                 tokenizer: Callable[[Sequence[str]], torch.Tensor],
                 rank: int = 0, world_size: int = 1, seed: int = 0, workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source, self.batch_size = source, batch_size
        self.transform, self.tokenizer = transform, tokenizer
        self.rank, self.world, self.seed = rank, world_size, seed
        self.epoch = self.position = self.skipped = 0
        self._pool = ThreadPoolExecutor(workers) if workers > 0 else None
        self._stream: Optional[Iterator] = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.skipped = int(state["epoch"]), int(state["position"]), int(state["skipped"])
        self._stream = None

    # a stream of zero-argument loaders of (image, caption), one per raw sample, from the current position
    def _raw(self) -> Iterator[Callable[[], Tuple[Image.Image, str]]]:
        src = self.source
        while True:
            if isinstance(src, SyntheticShapes):  # infinite: one epoch
                j = self.position
                while True:
                    yield (lambda i=self.rank + self.world * j: src[i])
                    j += 1
            if isinstance(src, TableSource):
                perm = np.random.default_rng([self.seed, self.epoch, 13]).permutation(len(src))
                for k in range(self.rank + self.world * self.position, len(src), self.world):
                    yield (lambda i=int(perm[k]): src.load(i))
            else:
                stream = src.stream(self.rank, self.world, self.epoch, self.seed)
                for _ in range(self.position):  # replay to the saved position without decoding
                    next(stream, None)
                for raw in stream:
                    yield (lambda s=raw: _decode_shard_sample(s))
            if self.position == 0:
                raise ValueError("--data: the dataset has no samples for this process")
            self.epoch, self.position = self.epoch + 1, 0

    def _load_one(self, fn) -> Optional[Tuple[torch.Tensor, str]]:
        try:
            img, caption = fn()
            return self.transform(img), caption
        except Exception:  # noqa: BLE001 - any unreadable sample is skipped and counted, never a crash
            return None

    def __iter__(self):
        return self

    def __next__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        if self._stream is None:
            self._stream = self._raw()
        images: List[torch.Tensor] = []
        captions: List[str] = []
        tries = 0
        while len(images) < self.batch_size:
            need = self.batch_size - len(images)
            fns = []
            for _ in range(need):  # position advances one raw sample at a time, so a saved state is exact
                fns.append(next(self._stream))
                self.position += 1
            loaded = self._pool.map(self._load_one, fns) if self._pool else map(self._load_one, fns)
            for item in loaded:
                if item is None:
                    self.skipped += 1
                else:
                    images.append(item[0])
                    captions.append(item[1])
            tries += need
            if not images and tries >= max(1000, 10 * self.batch_size):
                raise ValueError(f"--data: none of the last {tries} samples could be read (all skipped as corrupt)")
        return torch.stack(images), self.tokenizer(captions)


def heldout_set(seed: int, image_size: int, n: int,
                transform: Callable) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """The synthetic held-out split's first ``n`` images (n, 3, H, W), labels (n,) and the class names."""
    ds = SyntheticShapes(seed, "heldout", image_size)
    images = torch.stack([transform(ds[i][0]) for i in range(n)])
    labels = torch.tensor([ds.label(i) for i in range(n)])
    return images, labels, ds.classnames


def image_folder_set(root: str, transform: Callable, classnames: Optional[str] = None, limit: int = 0):
    """An image-folder dataset (``root/<class>/<image>``, classes in sorted folder order): images, labels and the
    class names (folder names with ``_`` as spaces, or one per line from the file ``classnames``)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--eval-data: folder {root!r} not found")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise ValueError(f"--eval-data: {root!r} has no class folders (expected root/<class>/<image>)")
    names = [f.replace("_", " ") for f in folders]
    if classnames:
        with open(classnames, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f"--eval-classnames: {len(names)} names for {len(folders)} class folders in {root!r}")
    images, labels = [], []
    for label, folder in enumerate(folders):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            try:
                with open(os.path.join(root, folder, name), "rb") as f:
                    images.append(transform(_decode_image(f.read())))
                labels.append(label)
            except Exception:  # noqa: BLE001 - unreadable files are not part of the evaluation set
                continue
    if not images:
        raise ValueError(f"--eval-data: no readable image in {root!r}")
    if limit and len(images) > limit:
        keep = np.random.default_rng(0).permutation(len(images))[:limit]
        images, labels = [images[i] for i in keep], [labels[i] for i in keep]
    return torch.stack(images), torch.tensor(labels), names


__all__ = ["SyntheticShapes", "TableSource", "ShardSource", "Loader", "make_source", "expand_shards", "heldout_set",
           "image_folder_set", "CachedTokenizer", "COLOURS", "SHAPES", "SIZES", "BACKGROUNDS", "TEMPLATES",
           "CLASS_TEMPLATES"]
