"""``fastclip.train``: a lean CLIP/SigLIP trainer built on fastclip's losses, towers, tokenizer and transforms.

    from fastclip.train import Trainer, resolve
    Trainer(resolve(["--data", "synthetic", "--steps", "300", "--out", "runs/demo"])).run()

or ``fastclip train --help``. Parts: :mod:`~fastclip.train.data` (synthetic shapes, webdataset shards, CSV/TSV,
resumable loader), :mod:`~fastclip.train.gradcache` (gradient caching), :mod:`~fastclip.train.loop` (the trainer),
:mod:`~fastclip.train.checkpoint` (atomic checkpoints), :mod:`~fastclip.train.evaluate` (zero-shot),
:mod:`~fastclip.train.models` (the tiny configs).
"""
from fastclip.train.cli import DEFAULTS, main, resolve
from fastclip.train.data import Loader, SyntheticShapes
from fastclip.train.gradcache import backward_step
from fastclip.train.loop import NonFiniteLossError, Trainer
from fastclip.train.models import TINY_MODELS, build_model

__all__ = ["Trainer", "NonFiniteLossError", "resolve", "main", "DEFAULTS", "Loader", "SyntheticShapes",
           "backward_step", "TINY_MODELS", "build_model"]
