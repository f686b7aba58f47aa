"""Zero-shot classification: each image is assigned the class whose text embedding is nearest.

Class embedding c_k = normalize(mean_t normalize(f_text(template_t(name_k)))) over the templates; logits
l_ik = <normalize(f_image(x_i)), c_k>; top-k accuracy = mean_i [y_i among the k largest l_ik]. Chance level (a
uniform guess) is 1 / number of classes for top-1 and k / number of classes for top-k.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def class_embeddings(model, classnames: Sequence[str], templates: Sequence[str], tokenizer: Callable,
                     device) -> Tensor:
    """(C, E) normalized class embeddings, each the normalized mean of its templates' text embeddings."""
    texts = [t.format(c) for c in classnames for t in templates]
    emb = model.encode_text(tokenizer(texts).to(device), normalize=True).float()
    emb = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)  # (C, T, E) -> (C, E)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def zero_shot(model, images: Tensor, labels: Tensor, classnames: Sequence[str], templates: Sequence[str],
              tokenizer: Callable, *, batch_size: int = 256, autocast: Callable[[], ContextManager] = nullcontext
              ) -> dict:
    """{"zeroshot_top1", "zeroshot_top5", "chance", "eval_samples", "num_classes"} of ``model`` (put in eval mode
    for the call, then restored) on images (n, 3, H, W) with integer labels (n,)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast():
            classes = class_embeddings(model, classnames, templates, tokenizer, device)
            correct1 = correct5 = 0
            k = min(5, len(classnames))
            for i in range(0, images.shape[0], batch_size):
                x = images[i:i + batch_size].to(device)
                y = labels[i:i + batch_size].to(device)
                logits = model.encode_image(x, normalize=True).float() @ classes.T  # (b, C)
                top = logits.topk(k, dim=-1).indices  # (b, k)
                correct1 += (top[:, 0] == y).sum().item()
                correct5 += (top == y[:, None]).any(dim=-1).sum().item()
    finally:
        model.train(was_training)
    n = images.shape[0]
    return {"zeroshot_top1": correct1 / n, "zeroshot_top5": correct5 / n, "chance": 1.0 / len(classnames),
            "eval_samples": n, "num_classes": len(classnames)}


__all__ = ["zero_shot", "class_embeddings"]
