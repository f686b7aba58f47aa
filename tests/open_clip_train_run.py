"""Runs open_clip_train on its synthetic dataset, given a few random classes so that the loss moves: stock and
through ``python -m fastclip.integrations.open_clip_train``, CLIP and SigLIP, and writes each run's per-step losses
to ``<out>/losses-<rank>.json``. Used by tests/test_integrations_open_clip.py, alone or under torchrun (gloo).

    python tests/open_clip_train_run.py OUT [--steps N] [--ring] [--extra=ARG ...]

``--ring`` adds runs with ``--fastclip-loss-impl ring``; ``--extra=ARG`` passes ARG to the fastclip runs.
"""
import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

import open_clip
import open_clip.factory
import open_clip_train.data
import open_clip_train.main as train
import fastclip.nn
from fastclip.integrations import open_clip_train as launcher

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
CLASSES = 4
BATCH = 8


class RandomClasses(open_clip_train.data.SyntheticDataset):
    """open_clip_train's SyntheticDataset with CLASSES random images and captions instead of one black image."""

    def __init__(self, transform=None, image_size=(224, 224), caption="", dataset_size=100, tokenizer=None):
        super().__init__(transform, image_size, caption, dataset_size, tokenizer)
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8))
                       for _ in range(CLASSES)]
        self.captions = [f"a photo of thing number {k}" for k in range(CLASSES)]

    def __getitem__(self, idx):
        k = idx % CLASSES
        return self.transform(self.images[k]), self.preprocess_txt(self.captions[k])


class CpuDDP(torch.nn.parallel.DistributedDataParallel):
    """open_clip_train passes device_ids=[device] to DDP, which torch refuses for a CPU module: drop them there."""

    def __init__(self, module, device_ids=None, **kwargs):
        cpu = device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids)
        super().__init__(module, device_ids=None if cpu else device_ids, **kwargs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--ring", action="store_true")
    p.add_argument("--extra", action="append", default=[], help="an argument for the fastclip runs")
    cli = p.parse_args()
    config = os.path.join(cli.out, "fastclip-tiny.json")
    with open(config, "w") as f:
        json.dump(TINY, f)
    open_clip.add_model_config(config)
    open_clip_train.data.SyntheticDataset = RandomClasses
    torch.nn.parallel.DistributedDataParallel = CpuDDP
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # one process group for all the runs: open_clip_train's init then finds it there
        torch.distributed.init_process_group("gloo")
        init = torch.distributed.init_process_group
        torch.distributed.init_process_group = lambda *a, **k: None if torch.distributed.is_initialized() else init(
            *a, **k)

    record = {}

    def recording_create_loss(args):
        loss = open_clip.factory.create_loss(args)
        record["loss_class"] = type(loss).__name__
        loss.register_forward_hook(lambda m, i, out: record["losses"].append(float(out["contrastive_loss"])))
        return loss

    train.create_loss = recording_create_loss
    flash_attention = fastclip.nn.flash_attention

    def counting_flash_attention(*args, **kwargs):
        record["fused_calls"] += 1
        return flash_attention(*args, **kwargs)

    fastclip.nn.flash_attention = counting_flash_attention
    results = {}
    for kind in ("clip", "siglip"):
        for run in ("stock", "fastclip") + (("fastclip-ring",) if cli.ring else ()):
            record.update(losses=[], fused_calls=0)
            argv = ["--model", "fastclip-tiny", "--dataset-type", "synthetic", "--device", "cpu",
                    "--precision", "fp32", "--train-num-samples", str(BATCH * world * cli.steps),
                    "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0", "--lr", "1e-3", "--warmup", "2",
                    "--seed", "0", "--log-every-n-steps", "1", "--save-frequency", "0", "--zeroshot-frequency", "0",
                    "--val-frequency", "0", "--logs", os.path.join(cli.out, "logs"), "--name", f"{kind}-{run}",
                    "--report-to", ""] + (["--siglip"] if kind == "siglip" else [])
            if run == "stock":
                train.main(argv)
            else:
                launcher.main(argv + cli.extra + (["--fastclip-loss-impl", "ring"] if run == "fastclip-ring" else []))
            results[f"{kind}-{run}"] = dict(record)
    with open(os.path.join(cli.out, f"losses-{os.environ.get('RANK', 0)}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
