"""A tiny random CLIP and a small generated image folder, for the zero-shot, retrieval and command tests."""
import os

import torch

TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=1, head_width=64),
            text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def tiny_model(seed: int = 0):
    from fastclip.models import CLIP

    torch.manual_seed(seed)
    return CLIP(**TINY).eval()


def save_tiny_checkpoint(path: str) -> str:
    """The tiny model's weights at ``path`` and its open_clip config at ``path`` + ".json"."""
    import json

    torch.save(tiny_model().state_dict(), path)
    with open(path + ".json", "w") as f:
        json.dump({**TINY, "quick_gelu": False}, f)
    return path


def make_image_folder(root: str, per_class: int = 3, unreadable: bool = True) -> dict:
    """root/<color>_<shape>/<n>.png (nested one level for the odd ones) and a corrupt file; returns {class: [paths]}."""
    from PIL import Image, ImageDraw

    out = {}
    for color, rgb in COLORS.items():
        for shape in ("circle", "square"):
            cls = f"{color}_{shape}"
            folder = os.path.join(root, cls)
            os.makedirs(os.path.join(folder, "more"), exist_ok=True)
            for n in range(per_class):
                img = Image.new("RGB", (40 + 3 * n, 36), (255, 255, 255))
                d = ImageDraw.Draw(img)
                box = (6 + n, 6, 30 + n, 30)
                (d.ellipse if shape == "circle" else d.rectangle)(box, fill=rgb)
                path = os.path.join(folder, "more" if n % 2 else "", f"{n}.png")
                img.save(path)
                out.setdefault(cls, []).append(path)
    if unreadable:
        with open(os.path.join(root, "red_circle", "broken.jpg"), "wb") as f:
            f.write(b"not an image")
    return out
