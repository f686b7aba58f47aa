"""Zero-shot classifier equal to open_clip's builder; recall@k equal to CLIP_benchmark's; shipped metadata."""
import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip import retrieval, zeroshot
from tests.use_helpers import make_image_folder, tiny_model


def test_shipped_metadata_equals_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert zeroshot.IMAGENET_CLASSNAMES == tuple(IMAGENET_CLASSNAMES)
    assert zeroshot.OPENAI_IMAGENET_TEMPLATES == tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    assert len(zeroshot.CIFAR10_CLASSNAMES) == 10 and zeroshot.CIFAR10_CLASSNAMES[0] == "airplane"
    assert len(zeroshot.CIFAR100_CLASSNAMES) == 100 and zeroshot.CIFAR100_CLASSNAMES[1] == "aquarium fish"


@pytest.mark.parametrize("per_batch", [10, 3, None])
def test_classifier_equals_open_clip(per_batch):
    from open_clip import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    model = tiny_model()
    names = list(zeroshot.IMAGENET_CLASSNAMES[:13])
    ours = zeroshot.build_zero_shot_classifier(model, fastclip.tokenize, names, zeroshot.OPENAI_IMAGENET_TEMPLATES[:7],
                                               num_classes_per_batch=per_batch)
    theirs = build_zero_shot_classifier(model, fastclip.tokenize, names, OPENAI_IMAGENET_TEMPLATES[:7],
                                        num_classes_per_batch=per_batch)
    assert ours.shape == (32, 13)
    assert torch.equal(ours, theirs)
    # callables as templates, as open_clip accepts them
    ours_fn = zeroshot.build_zero_shot_classifier(model, fastclip.tokenize, names, OPENAI_IMAGENET_TEMPLATES[:7],
                                                  num_classes_per_batch=per_batch)
    assert torch.equal(ours_fn, theirs)


def test_classifier_bad_input():
    with pytest.raises(ValueError, match="templates"):
        zeroshot.build_zero_shot_classifier(tiny_model(), fastclip.tokenize, ["cat"], [])
    with pytest.raises(ValueError, match="classnames"):
        zeroshot.build_zero_shot_classifier(tiny_model(), fastclip.tokenize, "cat", ["a {}"])


def _clip_benchmark_recall(img, txt, t2i, ks):
    """CLIP_benchmark's evaluate(), from the features on (its own recall_at_k and batchify)."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = txt @ img.t()
    positive = torch.zeros_like(scores, dtype=bool)
    positive[torch.arange(len(scores)), t2i] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (batchify(recall_at_k, scores, positive, 16, "cpu", k=k) > 0
                                              ).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (batchify(recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0
                                             ).float().mean().item()
    return out


@pytest.mark.parametrize("n_img,d", [(57, 16), (200, 33)])
def test_recall_equals_clip_benchmark(n_img, d):
    img = F.normalize(torch.randn(n_img, d), dim=-1)
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img - 1, (n_img,))])  # 1 to several captions
    t2i = t2i[t2i != n_img - 1]  # the last image has no caption: it counts as a miss in text retrieval
    txt = F.normalize(img[t2i] + 1.5 * torch.randn(len(t2i), d), dim=-1)  # noisy captions: recall between 0 and 1
    ks = (1, 5, 10)
    ours = retrieval.recall_at_k(img, txt, t2i, ks)
    theirs = _clip_benchmark_recall(img, txt, t2i, ks)
    assert list(ours) == list(theirs)
    assert ours == theirs
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1


def test_recall_k_beyond_candidates_and_errors():
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    t2i = [0, 0, 1, 2, 3, 3]
    out = retrieval.recall_at_k(img, txt, t2i, ks=(1, 10))
    assert out["image_retrieval_recall@10"] == 1.0 and out["text_retrieval_recall@10"] == 1.0
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval.recall_at_k(img, txt, [0, 1], ks=(1,))
    with pytest.raises(ValueError, match="outside"):
        retrieval.recall_at_k(img, txt, [0, 0, 1, 2, 3, 4], ks=(1,))


def test_evaluate_zero_shot_on_image_folder(tmp_path):
    make_image_folder(str(tmp_path), unreadable=False)
    model = tiny_model()
    preprocess = fastclip.image_transform(32)
    templates = ["a photo of a {}.", "a {}."]
    out = zeroshot.evaluate_zero_shot(model, fastclip.tokenize, preprocess, str(tmp_path), templates=templates,
                                      batch_size=4)
    # the same numbers from the full logits and torch.topk
    data = zeroshot.ImageFolder(str(tmp_path), preprocess)
    names = [c.replace("_", " ") for c in data.classes]
    clf = zeroshot.build_zero_shot_classifier(model, fastclip.tokenize, names, templates)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(torch.stack([data[i][0] for i in range(len(data))])), dim=-1)
    labels = torch.tensor([lab for _, lab in data.samples])
    top = (feats @ clf).topk(5, dim=1).indices
    assert out["num_samples"] == 18 and out["num_classes"] == 6
    assert out["top1"] == (top[:, 0] == labels).sum().item() / 18
    assert out["top5"] == (top == labels[:, None]).any(1).sum().item() / 18
